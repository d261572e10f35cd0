"""psycopg 3 (extended protocol): pipeline mode, prepared statements, binary results, COPY."""

import datetime
import threading
import uuid
from decimal import Decimal

import psycopg
import psycopg.errors
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from common import check, eq, main, raises, step

UTC = datetime.timezone.utc


def run(dsn):
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)

    with step("parameter status"):
        version = conn.info.parameter_status("server_version")
        check(version is not None and int(version.split(".")[0]) >= 10, f"server_version {version!r}")
        eq(conn.info.parameter_status("client_encoding"), "UTF8", "client_encoding")
        eq(conn.info.parameter_status("standard_conforming_strings"), "on", "standard_conforming_strings")
        check(conn.info.server_version >= 100000, f"info.server_version {conn.info.server_version}")
        conn.execute(
            "CREATE TABLE p3_items (id int PRIMARY KEY, v text NOT NULL, n numeric, at timestamptz DEFAULT now())"
        )

    with step("pipeline: many inserts and selects"):
        check(psycopg.Pipeline.is_supported(), f"libpq {psycopg.pq.version()} supports pipeline mode")
        with conn.pipeline():
            with conn.cursor() as cur:
                for i in range(300):
                    cur.execute("INSERT INTO p3_items (id, v, n) VALUES (%s, %s, %s)", (i, f"v{i}", Decimal(i) / 4))
            counts = [conn.execute("SELECT count(*) FROM p3_items WHERE id < %s", (k,)) for k in (10, 100, 300)]
            echo = conn.execute("SELECT %s::text || %s::text", ("a", "b"))
            eq([c.fetchone()[0] for c in counts], [10, 100, 300], "counts read back inside the pipeline")
            eq(echo.fetchone()[0], "ab", "text concat inside the pipeline")
            more = conn.execute("SELECT sum(n) FROM p3_items")
        eq(more.fetchone()[0], sum(Decimal(i) / 4 for i in range(300)), "sum after the pipeline closed")

    with step("pipeline: executemany"):
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO p3_items (id, v) VALUES (%s, %s) RETURNING id * 2",
                [(i, f"m{i}") for i in range(1000, 1100)],
                returning=True,
            )
            doubled = []
            while True:
                doubled.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
        eq(doubled, [i * 2 for i in range(1000, 1100)], "RETURNING rows of executemany")

    with step("pipeline: an error aborts up to the sync, then recovery"):
        with raises_in_pipeline(psycopg.errors.UniqueViolation, "duplicate key inside a pipeline") as box:
            with conn.pipeline() as p:
                conn.execute("INSERT INTO p3_items (id, v) VALUES (2000, 'kept')")
                p.sync()
                conn.execute("INSERT INTO p3_items (id, v) VALUES (2001, 'same implicit transaction as the error')")
                conn.execute("INSERT INTO p3_items (id, v) VALUES (1, 'duplicate')")
                conn.execute("INSERT INTO p3_items (id, v) VALUES (2002, 'skipped after the error')")
        eq(box.error.sqlstate, "23505", "sqlstate of the error in the pipeline")
        ids = [r[0] for r in conn.execute("SELECT id FROM p3_items WHERE id BETWEEN 2000 AND 2010 ORDER BY id")]
        eq(ids, [2000], "only the statement before the sync survived")
        # Pipeline inside an explicit transaction, error, rollback, and a clean pipeline after it.
        with raises_in_pipeline(psycopg.errors.DivisionByZero, "division by zero in a transaction pipeline"):
            with conn.transaction():
                with conn.pipeline():
                    conn.execute("INSERT INTO p3_items (id, v) VALUES (2003, 'rolled back')")
                    conn.execute("SELECT 1 / 0")
        eq(conn.info.transaction_status, TransactionStatus.IDLE, "idle after the failed transaction")
        with conn.pipeline():
            a = conn.execute("SELECT count(*) FROM p3_items WHERE id = 2003")
            b = conn.execute("SELECT %s::int + 1", (41,))
        eq((a.fetchone()[0], b.fetchone()[0]), (0, 42), "pipeline works after the errors")

    with step("prepared statements: prepare=True and prepare_threshold"):
        conn.prepare_threshold = 2
        conn.prepared_max = 5
        for i in range(40):
            row = conn.execute("SELECT v, n FROM p3_items WHERE id = %s", (i,)).fetchone()
            eq(row, (f"v{i}", Decimal(i) / 4), f"auto-prepared select, id {i}")
            eq(
                conn.execute("SELECT %s::int * 3", (i,), prepare=True).fetchone()[0],
                i * 3,
                "explicitly prepared select",
            )
        # More distinct statements than prepared_max: psycopg deallocates the oldest.
        for round_ in range(3):
            for k in range(12):
                for _ in range(3):
                    got = conn.execute(f"SELECT %s::int + {k}", (round_,)).fetchone()[0]
                    eq(got, round_ + k, f"statement {k} round {round_}")
        # Prepared statements inside transactions and in a pipeline.
        with conn.transaction():
            for i in range(10):
                eq(conn.execute("SELECT %s::text", (f"tx{i}",), prepare=True).fetchone()[0], f"tx{i}", "prepared in tx")
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 5", (i,), prepare=True) for i in range(20)]
        eq([c.fetchone()[0] for c in curs], [i * 5 for i in range(20)], "prepared statements in a pipeline")
        # A prepared statement whose execution fails, then is reused.
        for i in (1, 0, 2):
            if i == 0:
                raises(psycopg.errors.DivisionByZero, lambda: conn.execute("SELECT 10 / %s::int", (0,), prepare=True), "1/0")
            else:
                eq(conn.execute("SELECT 10 / %s::int", (i,), prepare=True).fetchone()[0], 10 // i, "10 / i")

    with step("prepared statements from 6 concurrent connections, non-autocommit"):
        errors = []

        def worker(w):
            try:
                with psycopg.connect(dsn, connect_timeout=10, prepare_threshold=0) as c:
                    for i in range(40):
                        # Same SQL text, and psycopg's same statement names (_pg3_0…), on every connection.
                        got = c.execute("SELECT %s::int * 100 + %s::int, current_setting('application_name')",
                                        (w, i)).fetchone()
                        if got[0] != w * 100 + i:
                            raise AssertionError(f"worker {w}: got {got[0]} for {w * 100 + i}")
                        other = c.execute(f"SELECT %s::text || '-w{w}'", (str(i),)).fetchone()[0]
                        if other != f"{i}-w{w}":
                            raise AssertionError(f"worker {w}: got {other!r}")
                        c.commit()
            except Exception as e:  # noqa: BLE001
                errors.append(f"worker {w}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        eq(errors, [], "errors in concurrent prepared-statement workers")

    with step("binary results and binary parameters"):
        u = uuid.UUID("12345678-1234-5678-1234-567812345678")
        at = datetime.datetime(2024, 2, 29, 12, 30, 45, 123456, tzinfo=UTC)
        values = (
            2**40 + 1,
            Decimal("-12345678901234567890.000123"),
            "ünïcode text",
            True,
            datetime.date(1999, 12, 31),
            at,
            u,
            b"\x00\x01\xfe\xff",
            {"a": [1, 2.5, None], "b": "c"},
            [1, 2, 3, None],
            ["x", None, "y z"],
            1.25,
        )
        query = (
            "SELECT %b::int8, %b::numeric, %b::text, %b::bool, %b::date, %b::timestamptz, %b::uuid, "
            "%b::bytea, %b::jsonb, %b::int4[], %b::text[], %b::float8"
        )
        params = values[:8] + (Jsonb(values[8]),) + values[9:]
        with conn.cursor(binary=True) as cur:
            cur.execute(query, params)
            eq(cur.pgresult.fformat(0), 1, "result column format is binary")
            row = cur.fetchone()
        eq(row[:7], values[:7], "binary scalars")
        eq(bytes(row[7]), values[7], "binary bytea")
        eq(row[8:], values[8:], "binary jsonb and arrays")
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id, v, n FROM p3_items WHERE id < 50 ORDER BY id")
            rows = cur.fetchall()
        eq(rows, [(i, f"v{i}", Decimal(i) / 4) for i in range(50)], "binary rows from the table")
        with conn.cursor(binary=True) as cur:
            for i in range(6):  # crosses prepare_threshold with binary results
                cur.execute("SELECT %s::numeric * 2", (Decimal("1.5") + i,))
                eq(cur.fetchone()[0], (Decimal("1.5") + i) * 2, "binary numeric, repeated")

    with step("copy both directions (text and binary)"):
        conn.execute("CREATE TABLE p3_copy (id int, v text, at timestamptz)")
        at = datetime.datetime(2024, 5, 1, tzinfo=UTC)
        with conn.cursor() as cur:
            with cur.copy("COPY p3_copy (id, v, at) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, f"tab\there {i}" if i % 2 else None, at))
            eq(cur.rowcount, 1000, "rows copied in (text)")
            with cur.copy("COPY p3_copy (id, v, at) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text", "timestamptz"])
                for i in range(1000, 1500):
                    copy.write_row((i, f"bin {i}", at))
            eq(cur.rowcount, 500, "rows copied in (binary)")
            with cur.copy("COPY (SELECT id, v, at FROM p3_copy ORDER BY id) TO STDOUT") as copy:
                copy.set_types(["int4", "text", "timestamptz"])
                out = list(copy.rows())
            eq(len(out), 1500, "rows copied out (text)")
            eq(out[1], (1, "tab\there 1", at), "text copy row 1")
            eq(out[2], (2, None, at), "text copy row 2 (NULL)")
            with cur.copy("COPY (SELECT id, v FROM p3_copy WHERE id >= 1000 ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                out = list(copy.rows())
            eq(out, [(i, f"bin {i}") for i in range(1000, 1500)], "rows copied out (binary)")
            with cur.copy("COPY (SELECT 1 AS a) TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
                eq(b"".join(bytes(b) for b in copy), b"a\n1\n", "csv copy out with header")
        # COPY that fails in the middle, then the connection is fine.
        def bad_copy():
            with conn.cursor() as cur:
                with cur.copy("COPY p3_copy (id) FROM STDIN") as copy:
                    copy.write(b"1\n2\nthree\n")

        raises(psycopg.errors.InvalidTextRepresentation, bad_copy, "COPY with a bad row")
        eq(conn.execute("SELECT count(*) FROM p3_copy").fetchone()[0], 1500, "count after the failed COPY")

    with step("transactions: rollback, savepoints"):
        conn.autocommit = False
        with conn.transaction():
            conn.execute("INSERT INTO p3_items (id, v) VALUES (3000, 'outer')")
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO p3_items (id, v) VALUES (3001, 'inner')")
                    conn.execute("INSERT INTO p3_items (id, v) VALUES (3000, 'dup')")
            except psycopg.errors.UniqueViolation:
                pass
        conn.commit()
        eq(
            [r[0] for r in conn.execute("SELECT id FROM p3_items WHERE id >= 3000 ORDER BY id")],
            [3000],
            "savepoint rolled back the inner block only",
        )
        conn.rollback()
        conn.execute("INSERT INTO p3_items (id, v) VALUES (3002, 'rolled back')")
        conn.rollback()
        eq(conn.execute("SELECT count(*) FROM p3_items WHERE id = 3002").fetchone()[0], 0, "rollback")
        conn.rollback()

    conn.close()


class raises_in_pipeline:
    """Context manager: the block must raise `exc_type`; keeps it in `.error`."""

    def __init__(self, exc_type, what):
        self.exc_type, self.what, self.error = exc_type, what, None

    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        if typ is None:
            check(False, f"{self.what}: expected {self.exc_type.__name__}, nothing was raised")
        if issubclass(typ, self.exc_type):
            self.error = value
            return True
        return False


if __name__ == "__main__":
    main("psycopg3", run)
