-- DeliverTrack's system of record (ARCHITECTURE rule 4).
--
-- Written by the PostgreSQL sink, one transaction per dataflow epoch. Every table is the
-- current state of one collection the dataflow maintains, keyed by entity id, except the
-- two logs (`delivery_events`, `geofence_transitions`), which are append-only and keyed so
-- that writing the same row twice inserts it once.
--
-- Conventions:
-- * times are `timestamptz` (the dataflow's millisecond times are exact in them);
-- * positions are WGS84 degrees in `*_lat` / `*_lon` columns (PostGIS is not required);
--   the dataflow's fixed point (1e-7 degree) is recovered exactly by `round(lat * 1e7)`;
-- * where the dataflow keeps an integer unit (mm, mm/s, ms, tenths of a degree) the table
--   keeps that integer, so hydration reads back exactly what was written, and offers the
--   everyday unit beside it as a generated column;
-- * `*_epoch` columns hold the epoch that last wrote the row, numbered across restarts
--   (see `pipeline_progress`).

-- Customers are known to the pipeline only by id (from `delivery.created`): the sink
-- inserts a bare row for each new id, and the order system or the API fill in the profile.
CREATE TABLE customers (
    id            uuid        PRIMARY KEY,
    name          text,
    address       text,
    contact       text,
    first_seen_at timestamptz NOT NULL DEFAULT now()
);

-- Couriers: the profile (name, vehicle) belongs to the fleet management and is never
-- touched by the sink; the tracked columns are the dataflow's `couriers` collection.
-- A courier referenced by an assignment before its first fix has a row with NULL tracking.
CREATE TABLE couriers (
    id            uuid        PRIMARY KEY,
    name          text,
    vehicle_type  text,
    current_lat   double precision CHECK (current_lat BETWEEN -90 AND 90),
    current_lon   double precision CHECK (current_lon BETWEEN -180 AND 180),
    last_fix_at   timestamptz,
    -- The fix that produced the current position: the version of this row.
    last_event_id uuid,
    speed_mm_s    bigint CHECK (speed_mm_s >= 0),
    speed_mps     double precision GENERATED ALWAYS AS (speed_mm_s / 1000.0) STORED,
    heading_ddeg  integer CHECK (heading_ddeg BETWEEN 0 AND 3599),
    heading_deg   double precision GENERATED ALWAYS AS (heading_ddeg / 10.0) STORED,
    odometer_mm   bigint NOT NULL DEFAULT 0 CHECK (odometer_mm >= 0),
    odometer_m    double precision GENERATED ALWAYS AS (odometer_mm / 1000.0) STORED,
    active_hours  bigint NOT NULL DEFAULT 0 CHECK (active_hours >= 0),
    updated_epoch bigint,
    CHECK ((current_lat IS NULL) = (last_fix_at IS NULL)
       AND (current_lon IS NULL) = (last_fix_at IS NULL))
);

-- Zones (geofences). The geometry is the GeoJSON Polygon or MultiPolygon, positions
-- [lon, lat], as it arrived in `zone.upserted`. A deleted zone's row is removed; its
-- history, the deletion included, stays in `delivery_events`.
CREATE TABLE zones (
    id             uuid        PRIMARY KEY,
    name           text        NOT NULL,
    geometry       jsonb       NOT NULL CHECK (geometry ->> 'type' IN ('Polygon', 'MultiPolygon')),
    dwell_ms       bigint      NOT NULL DEFAULT 0 CHECK (dwell_ms >= 0),
    dwell_seconds  double precision GENERATED ALWAYS AS (dwell_ms / 1000.0) STORED,
    updated_at     timestamptz NOT NULL,
    -- The `zone.upserted` event of this version.
    event_id       uuid        NOT NULL,
    updated_epoch  bigint      NOT NULL
);

CREATE TABLE deliveries (
    id             uuid        PRIMARY KEY,
    customer_id    uuid        NOT NULL REFERENCES customers (id),
    courier_id     uuid        REFERENCES couriers (id),
    status         text        NOT NULL CHECK (status IN ('created', 'assigned', 'picked_up',
                                   'in_transit', 'delivered', 'failed', 'cancelled')),
    pickup_lat     double precision NOT NULL CHECK (pickup_lat BETWEEN -90 AND 90),
    pickup_lon     double precision NOT NULL CHECK (pickup_lon BETWEEN -180 AND 180),
    dropoff_lat    double precision NOT NULL CHECK (dropoff_lat BETWEEN -90 AND 90),
    dropoff_lon    double precision NOT NULL CHECK (dropoff_lon BETWEEN -180 AND 180),
    promised_by    timestamptz,
    created_at     timestamptz NOT NULL,
    assigned_at    timestamptz,
    picked_up_at   timestamptz,
    -- When it reached its terminal status (delivered, failed or cancelled).
    ended_at       timestamptz,
    delivered_at   timestamptz GENERATED ALWAYS AS
                       (CASE WHEN status = 'delivered' THEN ended_at END) STORED,
    -- The latest rating's score; the whole rating is in `ratings`.
    rating         smallint CHECK (rating BETWEEN 1 AND 5),
    -- Events applied to the delivery: its version, which only grows.
    version        bigint      NOT NULL CHECK (version > 0),
    updated_epoch  bigint      NOT NULL
);

-- A customer's deliveries by status, newest first (the API's "my deliveries" list).
CREATE INDEX deliveries_customer_status_created ON deliveries (customer_id, status, created_at DESC);
-- A courier's deliveries, newest first.
CREATE INDEX deliveries_courier_created ON deliveries (courier_id, created_at DESC)
    WHERE courier_id IS NOT NULL;
-- Active deliveries (those with an ETA): a small partial index over a large table.
CREATE INDEX deliveries_active ON deliveries (status, courier_id)
    WHERE status IN ('assigned', 'picked_up', 'in_transit');
-- Filtering all deliveries by status, newest first (`GET /deliveries?status=`).
CREATE INDEX deliveries_status_created ON deliveries (status, created_at DESC);

-- The current rating of each rated delivery (a later rating replaces an earlier one; every
-- rating given stays in `delivery_events`). Customer and courier are copied from the
-- delivery so that satisfaction queries need no join.
CREATE TABLE ratings (
    delivery_id  uuid        PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    customer_id  uuid        NOT NULL,
    courier_id   uuid,
    score        smallint    NOT NULL CHECK (score BETWEEN 1 AND 5),
    comment      text,
    rated_at     timestamptz NOT NULL
);

CREATE INDEX ratings_courier ON ratings (courier_id, rated_at DESC);

-- The ETA of every active delivery whose courier has reported a position.
CREATE TABLE etas (
    delivery_id   uuid        PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    courier_id    uuid        NOT NULL,
    -- The delivery status the estimate was made for.
    status        text        NOT NULL CHECK (status IN ('assigned', 'picked_up', 'in_transit')),
    remaining_m   bigint      NOT NULL CHECK (remaining_m >= 0),
    speed_mm_s    bigint      NOT NULL CHECK (speed_mm_s >= 0),
    speed_mps     double precision GENERATED ALWAYS AS (speed_mm_s / 1000.0) STORED,
    eta_at        timestamptz NOT NULL,
    -- The courier fix the estimate was computed from.
    as_of         timestamptz NOT NULL,
    updated_epoch bigint      NOT NULL
);

CREATE INDEX etas_courier ON etas (courier_id);

-- Which zones hold a delivery's dropoff point: the key of the per-zone success rates.
CREATE TABLE delivery_dropoff_zones (
    delivery_id uuid NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    zone_id     uuid NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    PRIMARY KEY (delivery_id, zone_id)
);

CREATE INDEX delivery_dropoff_zones_zone ON delivery_dropoff_zones (zone_id);

-- Which courier is inside which zone now (after the zone's dwell time).
CREATE TABLE zone_occupancy (
    courier_id  uuid   NOT NULL REFERENCES couriers (id) ON DELETE CASCADE,
    zone_id     uuid   NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    -- The epoch of the entry.
    since_epoch bigint NOT NULL,
    PRIMARY KEY (zone_id, courier_id)
);

CREATE INDEX zone_occupancy_courier ON zone_occupancy (courier_id);

-- Every geofence entry and exit, append-only. Zones and couriers are not foreign keys:
-- the history outlives a deleted zone. One row per (courier, zone, epoch, direction), so
-- writing an epoch again inserts nothing.
CREATE TABLE geofence_transitions (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    courier_id  uuid        NOT NULL,
    zone_id     uuid        NOT NULL,
    direction   text        NOT NULL CHECK (direction IN ('entered', 'exited')),
    -- Event time of the change that caused it, as far as the epoch tells: the courier's
    -- newest fix in the epoch, else the zone's upsert or deletion, else the epoch's newest
    -- event.
    occurred_at timestamptz,
    epoch       bigint      NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (courier_id, zone_id, epoch, direction)
);

CREATE INDEX geofence_transitions_zone ON geofence_transitions (zone_id, epoch);

-- The append-only log of every event the pipeline accepted (stale ones included: they are
-- facts that arrived late; refused ones go to the dead-letter queue instead). The event is
-- kept as its wire JSON; the entity ids are copied out so that an entity's history and
-- hydration are index lookups.
CREATE TABLE delivery_events (
    event_id    uuid        PRIMARY KEY,
    kind        text        NOT NULL CHECK (kind IN ('location.updated', 'delivery.created',
                                'status.changed', 'delivery.rated', 'zone.upserted', 'zone.deleted')),
    occurred_at timestamptz NOT NULL,
    delivery_id uuid,
    courier_id  uuid,
    zone_id     uuid,
    payload     jsonb       NOT NULL,
    -- Refused as `stale`: older than the state it would have replaced, so it changed
    -- nothing (a late fix adds no distance, no active hour). Hydration replays only the
    -- others.
    stale       boolean     NOT NULL DEFAULT false,
    -- The epoch it was first committed in.
    epoch       bigint      NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX delivery_events_occurred ON delivery_events (occurred_at);
CREATE INDEX delivery_events_delivery ON delivery_events (delivery_id, occurred_at)
    WHERE delivery_id IS NOT NULL;
CREATE INDEX delivery_events_courier ON delivery_events (courier_id, occurred_at)
    WHERE courier_id IS NOT NULL;
CREATE INDEX delivery_events_zone ON delivery_events (zone_id, occurred_at)
    WHERE zone_id IS NOT NULL;
CREATE INDEX delivery_events_epoch ON delivery_events (epoch);

-- How far the pipeline has committed. The sink writes the row first in every epoch's
-- transaction and only if the epoch is newer than the one recorded: that one conditional
-- update is what makes committing an epoch twice a no-op, and its row lock keeps two
-- writers apart. Epochs are numbered across restarts: a new process continues after
-- `epoch`, so an epoch number identifies one batch of input for good.
CREATE TABLE pipeline_progress (
    pipeline     text        PRIMARY KEY,
    epoch        bigint      NOT NULL CHECK (epoch >= 0),
    committed_at timestamptz NOT NULL DEFAULT now()
);
