-- The local side's host, as a session's [HOST:]PORT gives it: the service a server
-- session connects each stream to, or the address a client session listens on.
-- Every session before this migration used 127.0.0.1.
ALTER TABLE sessions ADD COLUMN local_host TEXT NOT NULL DEFAULT '127.0.0.1';
