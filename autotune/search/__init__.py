"""The search layer (optuna, mlflow): the pruner, the storage and its queries, tracking and sync."""
