-- Coordinated mode (pairing codes): how each session pairs, and what it paired with.
-- Every session before this migration used the seed's manual-address flow.

ALTER TABLE sessions ADD COLUMN mode TEXT NOT NULL DEFAULT 'seed'
    CHECK (mode IN ('seed', 'coordinated'));
-- The pairing code, written only once the session has ended (single use and expired by
-- then): a copy of the database never holds a code that still works.
ALTER TABLE sessions ADD COLUMN code TEXT;
-- The path the coordinated tunnel took: 'public' or 'lan'.
ALTER TABLE sessions ADD COLUMN path TEXT;
