"""A run's saved state: the run folder's checkpoints, written by the trainer and read by resume and by
``moecl eval`` / ``moecl predict`` / :func:`moecl.load_run` alike.

- :mod:`.layout`: what one checkpoint folder holds (trainer state, adapters or backbone, DDAS, optimizer and
  RNG per rank) with its one write and one read, and which checkpoint a command loads.
- :mod:`.files`: folder mechanics: checksummed manifest, verification, listing, pruning, nested state as
  safetensors + JSON (nothing unpickled).
- :mod:`.adapters`: the adapter state's two files; :mod:`.identity`: which backbone a checkpoint belongs to;
  :mod:`.atomic`: the single-file atomic write.

Nothing is imported here, so ``moecl report`` (which only needs :mod:`.atomic`) stays light.
"""
