"""KVG-Bench evaluation (``karl-verl eval``).

* :mod:`karl_verl.evaluation.paper`: the seen/unseen split and the paper's Table 1 figures;
* :mod:`karl_verl.evaluation.metrics`: Acc@0.5 and mean IoU per group of cases (pure), each case
  scored by :mod:`karl_verl.accuracy`;
* :mod:`karl_verl.evaluation.released`: the released evaluator's rules, ``--protocol released`` (pure);
* :mod:`karl_verl.evaluation.knowledge`: the released knowledge split, ``--knowledge-dir``;
* :mod:`karl_verl.evaluation.compare`: paired bootstrap intervals and McNemar's test, ``--compare``;
* :mod:`karl_verl.evaluation.bench`: reading the benchmark and predictions, running a model
  (:mod:`karl_verl.generation`), scoring;
* :mod:`karl_verl.evaluation.report`: the Table 1 text table, ``metrics.json`` and the chart;
* :mod:`karl_verl.evaluation.runner`: the whole command, :func:`~karl_verl.evaluation.runner.run_eval` and
  :func:`~karl_verl.evaluation.runner.run_compare`.
"""
