-- A courier's presence: the zones its newest fix is in, each with the event time since when
-- it has been in it without interruption, as `[[zone_id, since_ms], ...]` sorted by zone.
-- Hydration reads it back so that a restarted pipeline resumes dwell clocks where they were
-- (`CourierState::presence`). NULL for a courier without tracking, and for rows written
-- before this column existed (their dwell clocks restart).
ALTER TABLE couriers ADD COLUMN presence jsonb
    CHECK (presence IS NULL OR jsonb_typeof(presence) = 'array');
