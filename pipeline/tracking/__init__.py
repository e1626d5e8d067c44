"""MLflow: `runs.py` is a run's life (start, resume, end status, stale runs), `logged.py` what runs log (the
experiment, the params a stage reads, the resolved model, datasets, logged models, the parent run of an
execution), `pyfunc.py` the MLflow model of a trained model (text in, text out)."""
