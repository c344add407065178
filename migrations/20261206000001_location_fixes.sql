-- Location fixes leave `delivery_events` for a lean table of their own.
--
-- Fixes are about 95% of the stream. As `jsonb` rows of `delivery_events` each one cost its
-- wire JSON (parsed and stored), a random uuid primary key and four more B-tree entries,
-- and the sink's write path was bounded by PostgreSQL rather than by the pipeline's CPU.
-- Here a fix is the handful of typed columns it is: the sink writes them with binary COPY,
-- and the only B-tree is the key the readers need.
--
-- The key is `(courier_id, occurred_at, event_id)`:
-- * hydration reads each tracked courier's last accepted fixes (the speed window) by
--   walking that key backwards, and a courier's history is a range of it;
-- * a fix is one event, and event ids are unique, so a fix redelivered after a crash
--   between commit and acknowledgement carries the same key: it collides and is stored once.
--   (Keyed by `event_id` alone, every insert would land on a random leaf page of a large
--   index; keyed by courier first, the inserts of a courier go to the end of its range.)
--
-- Positions are WGS84 degrees and the optional device fields keep the dataflow's integer
-- units (mm/s, tenths of a degree, cm), as `couriers` does; no generated columns, a fix is
-- written far more often than read. `event_log` below gives the log as one relation.
--
-- Not partitioned: with no retention window for the history there is no partition to drop,
-- and routing every row costs the write path. A BRIN index on the event time costs next to
-- nothing to keep (rows arrive almost in time order) and serves time-range questions.
CREATE TABLE location_fixes (
    courier_id   uuid             NOT NULL,
    occurred_at  timestamptz      NOT NULL,
    event_id     uuid             NOT NULL,
    -- The epoch it was first committed in.
    epoch        bigint           NOT NULL,
    recorded_at  timestamptz      NOT NULL DEFAULT now(),
    lat          double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon          double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    speed_mm_s   integer          CHECK (speed_mm_s >= 0),
    accuracy_cm  integer          CHECK (accuracy_cm >= 0),
    heading_ddeg smallint         CHECK (heading_ddeg BETWEEN 0 AND 3599),
    -- Refused as `stale` (older than the courier's newest fix): kept as a fact that arrived
    -- late, skipped by hydration.
    stale        boolean          NOT NULL DEFAULT false,
    PRIMARY KEY (courier_id, occurred_at, event_id)
);

CREATE INDEX location_fixes_occurred ON location_fixes USING brin (occurred_at);

-- Users upgrade with data in place: the fixes logged so far move over. The typed values are
-- recovered from the wire JSON exactly as the contract decodes them (`numeric` rounds half
-- away from zero, as Rust's `f64::round` does; a heading of 359.96° is 0, north).
INSERT INTO location_fixes (courier_id, occurred_at, event_id, epoch, recorded_at, lat, lon,
                            speed_mm_s, accuracy_cm, heading_ddeg, stale)
SELECT e.courier_id, e.occurred_at, e.event_id, e.epoch, e.recorded_at,
       (e.payload ->> 'lat')::double precision,
       (e.payload ->> 'lon')::double precision,
       round((e.payload ->> 'speed_mps')::numeric * 1000)::integer,
       round((e.payload ->> 'accuracy_m')::numeric * 100)::integer,
       (round((e.payload ->> 'heading_deg')::numeric * 10)::integer % 3600)::smallint,
       e.stale
FROM delivery_events e
WHERE e.kind = 'location.updated';

DELETE FROM delivery_events WHERE kind = 'location.updated';

-- The other kinds stay in `delivery_events`, as before.
ALTER TABLE delivery_events DROP CONSTRAINT delivery_events_kind_check;
ALTER TABLE delivery_events ADD CONSTRAINT delivery_events_kind_check
    CHECK (kind IN ('delivery.created', 'status.changed', 'delivery.rated', 'zone.upserted',
                    'zone.deleted'));

-- Every accepted event, whatever its table: what a question about the whole log (did every
-- published event arrive once? what came in during epoch 42?) reads.
CREATE VIEW event_log AS
SELECT event_id, kind, occurred_at, delivery_id, courier_id, zone_id, stale, epoch, recorded_at
FROM delivery_events
UNION ALL
SELECT event_id, 'location.updated', occurred_at, NULL, courier_id, NULL, stale, epoch,
       recorded_at
FROM location_fixes;
