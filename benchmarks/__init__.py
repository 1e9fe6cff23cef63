"""moecl's performance harness: each module is a script run from the repository root as
``python -m benchmarks.NAME`` (``--help`` lists its flags); ``common`` holds what they share. Not installed
with the package: it measures moecl, it is not part of it."""
