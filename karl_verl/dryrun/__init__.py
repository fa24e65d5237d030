"""The built-in dry run (``karl-verl dryrun``): the whole KARL loop on built-in data, on CPU or as the GPU smoke
test (:mod:`karl_verl.dryrun.gpu`), and a pre-flight check of a real run."""
