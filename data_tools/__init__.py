"""Turning raw datasets into WebDataset shards and benchmark definitions (``python -m data_tools``).

Python API: ``data_tools.synthetic.build_world``, ``data_tools.folder.convert_folder``,
``data_tools.mtil.convert_mtil``, ``data_tools.cil.convert_cil``, ``data_tools.verify.verify``.
"""
