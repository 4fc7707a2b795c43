-- Remove every pgnotify_sync object: the capture triggers on watched tables (they
-- depend on pgnotify_sync.capture_row and go with it), the functions and the tables,
-- the event log included. Idempotent.
--   psql -1 -v ON_ERROR_STOP=1 -f sql/rollback.sql
SELECT pg_advisory_xact_lock(7310694521807741549);
DROP SCHEMA IF EXISTS pgnotify_sync CASCADE;
