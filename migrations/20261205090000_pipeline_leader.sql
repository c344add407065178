-- One writer per database (ARCHITECTURE rule 10).
--
-- `delivertrack run` holds a session-level advisory lock (key 4921403412966359883,
-- the bytes "DLVTRACK") on a connection of its own while it writes; a second process waits
-- for it as a hot standby. The lock alone cannot fence a writer that lost its lock
-- connection without noticing (a network partition), so every takeover also bumps
-- `generation` here, and every epoch's transaction reads this row `FOR SHARE` and commits
-- only when the generation is still its own (and its lock is still held). A takeover's bump
-- therefore waits for the epoch in flight, and every later epoch of the old writer fails.
CREATE TABLE pipeline_leader (
    pipeline    text        PRIMARY KEY,
    generation  bigint      NOT NULL CHECK (generation > 0),
    -- Who took over, for operators and the standby's log: command, pid, host, API address.
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);

-- The writer generation that committed the recorded epoch: the progress guard skips an
-- epoch as "already committed" only when it was its own writer's (a retried commit).
ALTER TABLE pipeline_progress ADD COLUMN generation bigint NOT NULL DEFAULT 0;
