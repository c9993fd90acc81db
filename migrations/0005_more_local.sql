-- A coordinated session's 2nd, 3rd... local side, in service order, as HOST:PORT texts
-- separated by spaces (IPv6 in brackets): the services a server session shares after
-- its first (local_host, local_port), or a client session's listener for each.
-- Every session before this migration had one local side.
ALTER TABLE sessions ADD COLUMN more_local TEXT NOT NULL DEFAULT '';
