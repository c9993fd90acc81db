-- Diagnostics of coordinated sessions (issue 13): the path predicted before the first
-- SYN beside the path taken (sessions.path), the NAT kinds of the pair, the setup time
-- and the pairing's timeline.

-- The predicted path: 'lan', 'public', 'relay' or 'none' (more kinds may come).
ALTER TABLE sessions ADD COLUMN predicted_path TEXT;
-- Why, in one sentence.
ALTER TABLE sessions ADD COLUMN prediction TEXT;
-- The pair's NAT kinds, sharer first: 'rst × symmetric' ('none', 'symmetric', 'drop',
-- 'rst', 'icmp', 'open' or 'unknown' each).
ALTER TABLE sessions ADD COLUMN nat_pair TEXT;
-- Milliseconds from the pairing's start to its path opening (NULL: none opened).
ALTER TABLE sessions ADD COLUMN setup_ms REAL;
-- The pairing's timeline: JSON, a list of marks (nopf_web/sessions/timeline.py).
ALTER TABLE sessions ADD COLUMN timeline TEXT;
CREATE INDEX sessions_by_nat_pair ON sessions (nat_pair, started_at);
