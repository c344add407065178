-- The aggregates analysts query with SQL: one table that mirrors the dataflow's `metrics`
-- collection row for row, and one view per question.
--
-- Why one table: the dataflow keeps a single collection of `(scope, tally)`, and after every
-- epoch this table must equal it. One table written by one batched upsert cannot drift
-- between families, and a new scope is a new `scope` value, not a new table. The views give
-- each family its typed key (a courier, a zone, an hour) and its readable figures, so
-- analysts never decode `scope_key`.
--
-- The counters are the dataflow's `Tally`, never ratios: rates and means are generated
-- columns over them, computed exactly as `Tally::success_rate` and friends compute them
-- (NULL where the Rust helper returns `None`).

CREATE TABLE metrics (
    -- 'overall', 'courier', 'dropoff_zone', 'hour_of_day' or 'weekday_hour'.
    scope        text     NOT NULL CHECK (scope IN ('overall', 'courier', 'dropoff_zone',
                              'hour_of_day', 'weekday_hour')),
    -- The key within the family, as text: '' (overall), the courier or zone id, the hour
    -- ('13'), or weekday and hour ('0:13', 0 = Monday). The typed columns below hold the
    -- same key for queries and joins.
    scope_key    text     NOT NULL,
    courier_id   uuid,
    zone_id      uuid,
    -- UTC weekday of the deliveries' creation, 0 = Monday (weekday_hour only).
    weekday      smallint CHECK (weekday BETWEEN 0 AND 6),
    -- UTC hour of the deliveries' creation (hour_of_day and weekday_hour).
    hour         smallint CHECK (hour BETWEEN 0 AND 23),

    deliveries                  bigint NOT NULL,
    active                      bigint NOT NULL,
    delivered                   bigint NOT NULL,
    failed                      bigint NOT NULL,
    cancelled                   bigint NOT NULL,
    -- Delivered deliveries that had a promise, and those delivered by it.
    promised                    bigint NOT NULL,
    on_time                     bigint NOT NULL,
    -- Sum over delivered deliveries of created → delivered, ms.
    created_to_delivered_ms     bigint NOT NULL,
    -- Delivered deliveries with a pickup time, and their sum of picked up → delivered, ms.
    picked_up_delivered         bigint NOT NULL,
    picked_up_to_delivered_ms   bigint NOT NULL,
    rated                       bigint NOT NULL,
    score_sum                   bigint NOT NULL,
    score_1                     bigint NOT NULL,
    score_2                     bigint NOT NULL,
    score_3                     bigint NOT NULL,
    score_4                     bigint NOT NULL,
    score_5                     bigint NOT NULL,
    -- Courier scope only: distance travelled (mm) and distinct active clock hours.
    distance_mm                 bigint NOT NULL,
    active_hours                bigint NOT NULL,

    success_rate double precision GENERATED ALWAYS AS (
        CASE WHEN delivered + failed + cancelled > 0
             THEN delivered::double precision / (delivered + failed + cancelled) END) STORED,
    on_time_rate double precision GENERATED ALWAYS AS (
        CASE WHEN promised > 0 THEN on_time::double precision / promised END) STORED,
    mean_delivery_seconds double precision GENERATED ALWAYS AS (
        CASE WHEN delivered > 0
             THEN created_to_delivered_ms::double precision / 1000.0 / delivered END) STORED,
    mean_pickup_to_delivery_seconds double precision GENERATED ALWAYS AS (
        CASE WHEN picked_up_delivered > 0
             THEN picked_up_to_delivered_ms::double precision / 1000.0 / picked_up_delivered END) STORED,
    mean_rating double precision GENERATED ALWAYS AS (
        CASE WHEN rated > 0 THEN score_sum::double precision / rated END) STORED,
    deliveries_per_active_hour double precision GENERATED ALWAYS AS (
        CASE WHEN active_hours > 0 THEN delivered::double precision / active_hours END) STORED,
    distance_km double precision GENERATED ALWAYS AS (distance_mm / 1000000.0) STORED,

    updated_epoch bigint NOT NULL,
    PRIMARY KEY (scope, scope_key),
    -- The typed key matches the family.
    CHECK (CASE scope
        WHEN 'overall'      THEN courier_id IS NULL AND zone_id IS NULL AND weekday IS NULL AND hour IS NULL
        WHEN 'courier'      THEN courier_id IS NOT NULL AND zone_id IS NULL AND weekday IS NULL AND hour IS NULL
        WHEN 'dropoff_zone' THEN zone_id IS NOT NULL AND courier_id IS NULL AND weekday IS NULL AND hour IS NULL
        WHEN 'hour_of_day'  THEN hour IS NOT NULL AND courier_id IS NULL AND zone_id IS NULL AND weekday IS NULL
        WHEN 'weekday_hour' THEN weekday IS NOT NULL AND hour IS NOT NULL AND courier_id IS NULL AND zone_id IS NULL
    END)
);

CREATE INDEX metrics_courier ON metrics (courier_id) WHERE courier_id IS NOT NULL;
CREATE INDEX metrics_zone ON metrics (zone_id) WHERE zone_id IS NOT NULL;

-- Courier efficiency: completed deliveries, mean delivery time, on-time rate, distance,
-- deliveries per active hour.
CREATE VIEW courier_efficiency AS
SELECT m.courier_id,
       c.name,
       c.vehicle_type,
       m.deliveries,
       m.active,
       m.delivered,
       m.failed,
       m.cancelled,
       m.success_rate,
       m.mean_delivery_seconds,
       m.mean_pickup_to_delivery_seconds,
       m.on_time_rate,
       m.distance_km,
       m.active_hours,
       m.deliveries_per_active_hour,
       m.mean_rating
FROM metrics m
LEFT JOIN couriers c ON c.id = m.courier_id
WHERE m.scope = 'courier';

-- Success rates in every grouping: overall, per dropoff zone, per courier, per hour of day.
-- `scope` says which; `scope_name` is the zone's or courier's name, or the hour.
CREATE VIEW success_rates AS
SELECT m.scope,
       m.courier_id,
       m.zone_id,
       m.hour,
       CASE m.scope
           WHEN 'overall'      THEN 'overall'
           WHEN 'courier'      THEN coalesce(c.name, m.scope_key)
           WHEN 'dropoff_zone' THEN coalesce(z.name, m.scope_key)
           WHEN 'hour_of_day'  THEN lpad(m.hour::text, 2, '0') || ':00 UTC'
       END AS scope_name,
       m.deliveries,
       m.active,
       m.delivered,
       m.failed,
       m.cancelled,
       m.success_rate,
       m.on_time_rate,
       m.mean_delivery_seconds
FROM metrics m
LEFT JOIN couriers c ON c.id = m.courier_id
LEFT JOIN zones z ON z.id = m.zone_id
WHERE m.scope IN ('overall', 'courier', 'dropoff_zone', 'hour_of_day');

-- Peak times: deliveries created per UTC weekday (0 = Monday) and hour.
CREATE VIEW peak_times AS
SELECT m.weekday,
       m.hour,
       m.deliveries,
       m.active,
       m.delivered,
       m.failed,
       m.cancelled,
       m.success_rate,
       m.on_time_rate,
       m.mean_delivery_seconds
FROM metrics m
WHERE m.scope = 'weekday_hour';

-- Customer satisfaction: mean rating and the histogram of scores, in every grouping.
CREATE VIEW satisfaction AS
SELECT m.scope,
       m.scope_key,
       m.courier_id,
       m.zone_id,
       m.weekday,
       m.hour,
       m.rated,
       m.mean_rating,
       m.score_1,
       m.score_2,
       m.score_3,
       m.score_4,
       m.score_5
FROM metrics m
WHERE m.rated > 0;
