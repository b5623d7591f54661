-- Roles and databases for the Prefect server and the MLflow tracking server (PostgreSQL >= 13).
-- Run once as the postgres superuser, passing the passwords as psql variables:
--
--   sudo -u postgres psql -v ON_ERROR_STOP=1 \
--     -v prefect_password="$PREFECT_DB_PASSWORD" -v mlflow_password="$MLFLOW_DB_PASSWORD" \
--     -f infra/servers/postgres-setup.sql
--
-- Each service owns its database, so its own migrations create every table (Prefect also creates
-- the pg_trgm extension, which PostgreSQL >= 13 lets a database owner create).
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect ENCODING 'UTF8';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow ENCODING 'UTF8';
