//! Writing an epoch's location fixes to `location_fixes`: most of every epoch's rows.
//!
//! The fixes no earlier epoch can have stored (see `batch`) are appended with binary `COPY`:
//! PostgreSQL then inserts them in multi-row batches and parses nothing but fixed-size
//! fields. `COPY` knows no `ON CONFLICT`, so it runs under a savepoint: should a fix be
//! there already after all (the same batch committed again by another process, which the
//! progress guard does not catch), the savepoint is rolled back and the rows go through the
//! insert that skips what is there. The fixes that may be stored already (stale ones and
//! replays, rare) always go through that insert. Either way a fix is stored once, keyed by
//! `(courier_id, occurred_at, event_id)`.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::batch::FixRows;

/// SQLSTATE `unique_violation`.
const UNIQUE_VIOLATION: &str = "23505";

/// Writes both kinds of fixes of epoch `epoch`.
///
/// # Errors
/// The driver's error, from whichever statement failed.
pub(super) async fn write(
    tx: &mut Transaction<'static, Postgres>,
    new: &FixRows,
    seen: &FixRows,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    if !new.is_empty() {
        sqlx::query("SAVEPOINT location_fixes")
            .execute(&mut **tx)
            .await?;
        match copy(tx, new, epoch).await {
            Ok(()) => {}
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some(UNIQUE_VIOLATION) =>
            {
                tracing::debug!(%error, "Fixes of the epoch were stored already; inserting the missing ones.");
                sqlx::query("ROLLBACK TO SAVEPOINT location_fixes")
                    .execute(&mut **tx)
                    .await?;
                insert_missing(tx, new, epoch).await?;
            }
            Err(error) => return Err(error),
        }
    }
    if !seen.is_empty() {
        insert_missing(tx, seen, epoch).await?;
    }
    Ok(())
}

/// Appends `rows` with binary `COPY`.
async fn copy(
    tx: &mut Transaction<'static, Postgres>,
    rows: &FixRows,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    let data = encode(rows, epoch);
    let mut copy = tx
        .copy_in_raw(
            "COPY location_fixes (courier_id, occurred_at, event_id, epoch, lat, lon, speed_mm_s,
                                  accuracy_cm, heading_ddeg, stale)
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    if let Err(error) = copy.send(data).await {
        // The connection is broken; the driver reports why at the next use anyway.
        let _ = copy.abort("sending the fixes failed").await;
        return Err(error);
    }
    copy.finish().await?;
    Ok(())
}

/// Inserts the rows whose key is not stored yet.
async fn insert_missing(
    tx: &mut Transaction<'static, Postgres>,
    rows: &FixRows,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO location_fixes (courier_id, occurred_at, event_id, lat, lon, speed_mm_s,
                                     accuracy_cm, heading_ddeg, stale, epoch)
         SELECT u.*, $10 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::uuid[], $4::float8[],
                                     $5::float8[], $6::int4[], $7::int4[], $8::int2[],
                                     $9::bool[]) AS u
         ON CONFLICT (courier_id, occurred_at, event_id) DO NOTHING",
    )
    .bind(&rows.courier_id)
    .bind(&rows.occurred_at)
    .bind(&rows.event_id)
    .bind(&rows.lat)
    .bind(&rows.lon)
    .bind(&rows.speed_mm_s)
    .bind(&rows.accuracy_cm)
    .bind(&rows.heading_ddeg)
    .bind(&rows.stale)
    .bind(epoch)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Microseconds between the Unix epoch and PostgreSQL's, 2000-01-01 00:00 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Bytes of one tuple: the field count, then per field its length and its value (ten fields,
/// none over 16 bytes).
const TUPLE_BYTES: usize = 2 + 10 * 4 + 16 + 8 + 16 + 8 + 8 + 8 + 4 + 4 + 2 + 1;

/// `rows` in `COPY`'s binary format (PostgreSQL docs, "COPY", *Binary Format*): the
/// signature and two zero words, then per tuple a 16-bit field count and per field a 32-bit
/// length (`-1` for NULL) followed by the value in the type's binary send format, all big
/// endian, and a 16-bit `-1` at the end. The column order is the `COPY` statement's.
fn encode(rows: &FixRows, epoch: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + rows.len() * TUPLE_BYTES + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0_i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0_i32.to_be_bytes()); // header extension length
    for i in 0..rows.len() {
        out.extend_from_slice(&10_i16.to_be_bytes());
        field(&mut out, rows.courier_id[i].as_bytes());
        field(&mut out, &timestamptz(rows.occurred_at[i]));
        field(&mut out, rows.event_id[i].as_bytes());
        field(&mut out, &epoch.to_be_bytes());
        field(&mut out, &rows.lat[i].to_be_bytes());
        field(&mut out, &rows.lon[i].to_be_bytes());
        optional(&mut out, rows.speed_mm_s[i].map(i32::to_be_bytes));
        optional(&mut out, rows.accuracy_cm[i].map(i32::to_be_bytes));
        optional(&mut out, rows.heading_ddeg[i].map(i16::to_be_bytes));
        field(&mut out, &[u8::from(rows.stale[i])]);
    }
    out.extend_from_slice(&(-1_i16).to_be_bytes());
    out
}

/// One non-NULL field: its length, then its bytes. Every field here is at most 16 bytes.
fn field(out: &mut Vec<u8>, value: &[u8]) {
    let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(value);
}

fn optional<const N: usize>(out: &mut Vec<u8>, value: Option<[u8; N]>) {
    match value {
        Some(bytes) => field(out, &bytes),
        None => out.extend_from_slice(&(-1_i32).to_be_bytes()),
    }
}

/// A `timestamptz` as PostgreSQL sends it: microseconds since 2000-01-01 UTC. The times
/// here come from milliseconds that chrono could represent, far inside the range where this
/// cannot overflow.
fn timestamptz(at: DateTime<Utc>) -> [u8; 8] {
    at.timestamp_micros()
        .saturating_sub(POSTGRES_EPOCH_MICROS)
        .to_be_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn a_tuple_is_laid_out_as_copy_binary_expects() {
        let rows = FixRows {
            courier_id: vec![Uuid::from_u128(1)],
            occurred_at: vec![DateTime::from_timestamp_millis(946_684_800_001).unwrap()],
            event_id: vec![Uuid::from_u128(2)],
            lat: vec![52.5],
            lon: vec![13.4],
            speed_mm_s: vec![Some(8_100)],
            accuracy_cm: vec![None],
            heading_ddeg: vec![Some(925)],
            stale: vec![true],
        };
        let bytes = encode(&rows, 7);
        assert_eq!(&bytes[..11], b"PGCOPY\n\xff\r\n\0");
        assert_eq!(&bytes[11..19], &[0; 8]);
        let tuple = &bytes[19..bytes.len() - 2];
        assert_eq!(&tuple[..2], &10_i16.to_be_bytes());
        // courier: length 16, then the uuid's bytes.
        assert_eq!(&tuple[2..6], &16_i32.to_be_bytes());
        assert_eq!(&tuple[6..22], Uuid::from_u128(1).as_bytes());
        // occurred_at: 1 ms after PostgreSQL's epoch.
        assert_eq!(&tuple[22..26], &8_i32.to_be_bytes());
        assert_eq!(&tuple[26..34], &1_000_i64.to_be_bytes());
        // accuracy is NULL; the last field is the boolean.
        let accuracy = 34 + 20 + 12 + 12 + 12 + 8;
        assert_eq!(&tuple[accuracy..accuracy + 4], &(-1_i32).to_be_bytes());
        assert_eq!(&tuple[tuple.len() - 5..], &[0, 0, 0, 1, 1]);
        assert_eq!(&bytes[bytes.len() - 2..], &(-1_i16).to_be_bytes());
        assert!(tuple.len() <= TUPLE_BYTES);
    }
}
