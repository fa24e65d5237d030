"""The CPU dry run (``karl-verl dryrun``): the whole KARL loop on built-in data, and a pre-flight check."""
