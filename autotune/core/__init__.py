"""The core layer: errors, persisted names, the theory, the spec and its search space, user code.
Imports no torch, optuna, lightning or mlflow at import time.
"""
