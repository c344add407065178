-- Room on every page for the next version of a row, so that the per-epoch upserts are HOT
-- updates (heap-only: no index entry for the new version).
--
-- `couriers`, the courier scopes of `metrics` and the `etas` of active deliveries are
-- rewritten for every courier that moved, epoch after epoch; none of their indexed columns
-- changes then. On full pages (the default fillfactor, 100) each new version goes to
-- another page and takes a new entry in every index of the table; with free room on the
-- page it stays there and the indexes are untouched. Measured on `metrics` with 1 000
-- courier rows rewritten per statement: 28–41 ms at fillfactor 100, 16–20 ms at 50
-- (BENCHMARKS.md). Pages written from now on keep the room; `VACUUM FULL` of a table gives
-- its existing rows the room as well.
ALTER TABLE couriers SET (fillfactor = 50);
ALTER TABLE metrics SET (fillfactor = 50);
ALTER TABLE etas SET (fillfactor = 50);
