"""psycopg2 (libpq, text protocol, simple queries with client-side binding)."""

import datetime
import io
import threading
import time
import uuid
from decimal import Decimal

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from common import check, eq, main, raises, step

UTC = datetime.timezone.utc


def row_for(i):
    return (
        i,
        i * 10_000_000_007,
        Decimal(f"{i}.125"),
        f"name {i} ✓ 'quoted'",
        i % 2 == 0,
        datetime.date(2024, 1, 1) + datetime.timedelta(days=i),
        datetime.datetime(2024, 1, 1, tzinfo=UTC) + datetime.timedelta(hours=i, microseconds=i),
        uuid.UUID(int=i * 7919),
        bytes([i % 256, 0, 255]) * 3,
        {"i": i, "s": "x", "nested": [1, {"k": None}]},
        [f"t{i}", "b,c", None],
        [i, -i, 0],
    )


def run(dsn):
    psycopg2.extras.register_uuid()
    conn = psycopg2.connect(dsn, connect_timeout=10)
    cur = conn.cursor()

    with step("server_version and parameter status"):
        check(conn.server_version >= 100000, f"server_version {conn.server_version}")
        eq(conn.get_parameter_status("server_encoding"), "UTF8", "server_encoding")
        eq(conn.get_parameter_status("integer_datetimes"), "on", "integer_datetimes")
        cur.execute("SHOW server_version_num")
        eq(int(cur.fetchone()[0]), conn.server_version, "SHOW server_version_num")
        conn.rollback()

    with step("create table and executemany"):
        cur.execute(
            """CREATE TABLE p2_items (
                id int PRIMARY KEY, big bigint, amount numeric(12,3), name text,
                flag bool, day date, at timestamptz, uid uuid, blob bytea,
                doc json, tags text[], nums int[])"""
        )
        rows = [row_for(i) for i in range(1, 101)]
        cur.executemany(
            "INSERT INTO p2_items VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            [r[:9] + (psycopg2.extras.Json(r[9]),) + r[10:] for r in rows],
        )
        eq(cur.rowcount, 100, "rowcount summed over executemany")
        conn.commit()
        cur.execute("SELECT count(*), sum(big), sum(amount) FROM p2_items")
        eq(
            cur.fetchone(),
            (100, sum(r[1] for r in rows), sum(r[2] for r in rows)),
            "count/sum after executemany",
        )
        conn.commit()

    with step("parametrized select with many types"):
        for i in (1, 42, 100):
            expected = row_for(i)
            cur.execute(
                """SELECT id, big, amount, name, flag, day, at, uid, blob, doc, tags, nums
                   FROM p2_items
                   WHERE id = %s AND big = %s AND amount = %s AND name = %s AND flag = %s
                     AND day = %s AND at = %s AND uid = %s AND blob = %s AND tags = %s AND nums = %s""",
                (expected[0], expected[1], expected[2], expected[3], expected[4], expected[5],
                 expected[6], expected[7], psycopg2.Binary(expected[8]), expected[10], expected[11]),
            )
            got = cur.fetchall()
            eq(len(got), 1, f"rows matching every typed parameter for id {i}")
            got = got[0]
            eq(got[:8], expected[:8], f"scalar columns of row {i}")
            eq(bytes(got[8]), expected[8], f"bytea of row {i}")
            eq(got[9], expected[9], f"json of row {i}")
            eq(got[10], expected[10], f"text[] of row {i}")
            eq(got[11], expected[11], f"int[] of row {i}")
        cur.execute(
            "SELECT %s::float8, %s::text, %s IS NULL, %s::interval, %s::time",
            (1.5e300, "", None, datetime.timedelta(days=1, seconds=3), datetime.time(23, 59, 58)),
        )
        eq(
            cur.fetchone(),
            (1.5e300, "", True, datetime.timedelta(days=1, seconds=3), datetime.time(23, 59, 58)),
            "float8/empty text/NULL/interval/time round trip",
        )
        psycopg2.extras.execute_values(
            cur,
            "INSERT INTO p2_items (id, name) VALUES %s",
            [(i, f"ev{i}") for i in range(1001, 1051)],
            page_size=20,
        )
        cur.execute("SELECT count(*) FROM p2_items WHERE name LIKE 'ev%%'")
        eq(cur.fetchone()[0], 50, "rows from execute_values")
        conn.commit()

    with step("server-side named cursor inside a transaction"):
        with conn.cursor(name="p2_named") as named:
            named.itersize = 7
            named.execute("SELECT id, name FROM p2_items WHERE id <= 100 ORDER BY id")
            ids = [r[0] for r in named]
        eq(ids, list(range(1, 101)), "ids iterated through the named cursor")
        with conn.cursor(name="p2_scroll", scrollable=True) as named:
            named.execute("SELECT id FROM p2_items WHERE id <= 100 ORDER BY id")
            eq(named.fetchmany(3), [(1,), (2,), (3,)], "fetchmany(3)")
            named.scroll(50, mode="absolute")
            eq(named.fetchone(), (51,), "row after scroll(50, absolute)")
            named.scroll(-11)
            eq(named.fetchone(), (41,), "row after scroll(-11)")
        conn.commit()
        # withhold cursors survive the commit (on the same backend).
        with conn.cursor(name="p2_hold", withhold=True) as named:
            named.itersize = 10
            named.execute("SELECT id FROM p2_items WHERE id <= 30 ORDER BY id")
            first = named.fetchmany(5)
            conn.commit()
            rest = named.fetchall()
        conn.commit()
        eq([r[0] for r in first + rest], list(range(1, 31)), "WITH HOLD cursor across commit")

    with step("copy_expert both directions"):
        cur.execute("CREATE TABLE p2_copy (id int, name text, note text)")
        data = "".join(f'{i},"n,{i}",{"" if i % 3 else "x"}\n' for i in range(500))
        cur.copy_expert("COPY p2_copy FROM STDIN WITH (FORMAT csv)", io.StringIO(data))
        eq(cur.rowcount, 500, "rows copied in")
        conn.commit()
        out = io.StringIO()
        cur.copy_expert("COPY (SELECT * FROM p2_copy ORDER BY id) TO STDOUT WITH (FORMAT csv)", out)
        eq(out.getvalue(), data, "csv copied out equals csv copied in")
        out = io.StringIO()
        cur.copy_expert("COPY p2_copy (id) TO STDOUT", out)
        eq(len(out.getvalue().splitlines()), 500, "text-format COPY table TO STDOUT")
        bad = io.StringIO("1,a,b\nnot-a-number,a,b\n")
        e = raises(
            psycopg2.errors.InvalidTextRepresentation,
            lambda: cur.copy_expert("COPY p2_copy FROM STDIN WITH (FORMAT csv)", bad),
            "COPY with a bad row",
        )
        eq(e.pgcode, "22P02", "SQLSTATE of bad COPY data")
        conn.rollback()
        cur.execute("SELECT count(*) FROM p2_copy")
        eq(cur.fetchone()[0], 500, "failed COPY left nothing behind")
        conn.commit()

    with step("errors carry SQLSTATE; failed transaction; recovery"):
        e = raises(
            psycopg2.errors.UniqueViolation,
            lambda: cur.execute("INSERT INTO p2_items (id) VALUES (1)"),
            "duplicate primary key",
        )
        eq(e.pgcode, "23505", "pgcode of a unique violation")
        eq(e.diag.constraint_name, "p2_items_pkey", "diag.constraint_name")
        eq(e.diag.table_name, "p2_items", "diag.table_name")
        e = raises(
            psycopg2.errors.InFailedSqlTransaction,
            lambda: cur.execute("SELECT 1"),
            "statement in a failed transaction",
        )
        eq(e.pgcode, "25P02", "pgcode in a failed transaction")
        eq(
            conn.get_transaction_status(),
            psycopg2.extensions.TRANSACTION_STATUS_INERROR,
            "transaction status after an error",
        )
        conn.rollback()
        eq(
            conn.get_transaction_status(),
            psycopg2.extensions.TRANSACTION_STATUS_IDLE,
            "transaction status after rollback",
        )
        e = raises(psycopg2.errors.UndefinedTable, lambda: cur.execute("SELECT * FROM nope"), "missing table")
        eq(e.pgcode, "42P01", "pgcode of an undefined table")
        conn.rollback()
        e = raises(psycopg2.errors.SyntaxError, lambda: cur.execute("SELEC 1"), "syntax error")
        eq(e.pgcode, "42601", "pgcode of a syntax error")
        conn.rollback()
        cur.execute("SELECT 2")
        eq(cur.fetchone(), (2,), "connection usable after errors")
        conn.commit()

    with step("rollback visibility across connections"):
        other = psycopg2.connect(dsn, connect_timeout=10)
        other.autocommit = True
        ocur = other.cursor()
        cur.execute("INSERT INTO p2_items (id, name) VALUES (5000, 'uncommitted')")
        cur.execute("SELECT count(*) FROM p2_items WHERE id = 5000")
        eq(cur.fetchone()[0], 1, "own uncommitted row visible to itself")
        ocur.execute("SELECT count(*) FROM p2_items WHERE id = 5000")
        eq(ocur.fetchone()[0], 0, "uncommitted row invisible to another connection")
        conn.rollback()
        cur.execute("SELECT count(*) FROM p2_items WHERE id = 5000")
        eq(cur.fetchone()[0], 0, "rolled-back row gone")
        conn.commit()
        cur.execute("INSERT INTO p2_items (id, name) VALUES (5001, 'committed')")
        conn.commit()
        ocur.execute("SELECT name FROM p2_items WHERE id = 5001")
        eq(ocur.fetchone(), ("committed",), "committed row visible to another connection")
        other.close()

    with step("isolation level and session settings"):
        conn.set_session(isolation_level="SERIALIZABLE", readonly=True)
        cur.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')")
        eq(cur.fetchone(), ("serializable", "on"), "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
        raises(
            psycopg2.errors.ReadOnlySqlTransaction,
            lambda: cur.execute("INSERT INTO p2_items (id) VALUES (6000)"),
            "write in a read-only transaction",
        )
        conn.rollback()
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT")
        conn.autocommit = True
        cur.execute("SET TIME ZONE 'Asia/Kolkata'")
        cur.execute("SELECT '2024-01-01 00:00:00+00'::timestamptz::text")
        eq(cur.fetchone()[0], "2024-01-01 05:30:00+05:30", "timestamptz text in the SET time zone")
        cur.execute("SELECT current_setting('TimeZone')")
        eq(cur.fetchone()[0], "Asia/Kolkata", "TimeZone persists between autocommit statements")
        cur.execute("RESET TIME ZONE")
        conn.autocommit = False

    with step("notices"):
        del conn.notices[:]
        cur.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        eq(conn.notices, ["NOTICE:  hello 42\n", "WARNING:  careful\n"], "notices after RAISE")
        conn.commit()

    with step("cancel a running query"):
        conn.autocommit = True

        def cancel_soon():
            time.sleep(0.5)
            conn.cancel()

        t = threading.Thread(target=cancel_soon)
        t.start()
        started = time.monotonic()
        e = raises(psycopg2.errors.QueryCanceled, lambda: cur.execute("SELECT pg_sleep(20)"), "cancelled pg_sleep")
        t.join()
        eq(e.pgcode, "57014", "pgcode of a cancelled query")
        check(time.monotonic() - started < 10, "the cancel took effect promptly")
        cur.execute("SELECT 3")
        eq(cur.fetchone(), (3,), "connection usable after the cancel")
        conn.autocommit = False

    conn.close()


if __name__ == "__main__":
    main("psycopg2", run)
