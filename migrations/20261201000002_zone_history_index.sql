-- Hydration finds the zones that are no longer live (their tombstones) from their latest
-- accepted zone event. Without an index on the zone events that question reads the whole
-- event log, which is mostly location fixes; this partial index holds the zone events
-- alone, in the order the question asks for them.
CREATE INDEX delivery_events_zone_history
    ON delivery_events (zone_id, occurred_at DESC, event_id DESC)
    WHERE kind IN ('zone.upserted', 'zone.deleted') AND NOT stale;
