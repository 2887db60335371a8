-- MLflow gets a database of its own beside the Optuna study's: both keep their schema version in
-- a table named alembic_version, so they cannot share one. The postgres image runs this file once,
-- when its data volume is empty, as POSTGRES_USER, who then owns the new database.
CREATE DATABASE mlflow;
