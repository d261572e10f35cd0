"""asyncpg (extended protocol, binary format, named prepared statements everywhere)."""

import asyncio
import datetime
import hashlib
import io
import json
import uuid
from decimal import Decimal

import asyncpg

from common import check, eq, main, step

UTC = datetime.timezone.utc


async def expect_error(exc_type, coro, what):
    check(True, what)
    try:
        await coro
    except exc_type as e:
        return e
    raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


async def run(dsn):
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)

    with step("server version"):
        version = conn.get_server_version()
        check(version.major >= 10, f"server version {version}")
        # asyncpg sends client_encoding='utf-8' (quoted) in the startup packet;
        # Postgres normalises it and reports "UTF8"; so must shardgate.
        encoding = conn.get_settings().client_encoding
        eq(encoding, "UTF8", "ParameterStatus client_encoding as Postgres reports it")
        await conn.execute(
            """CREATE TABLE apg_items (id int PRIMARY KEY, v text, n numeric, u uuid, doc jsonb,
                                       tags text[], at timestamptz);
               CREATE TABLE apg_copy (id int, name text, amount numeric, at timestamptz)"""
        )

    with step("prepare() reused many times"):
        stmt = await conn.prepare("SELECT $1::int * 2 AS doubled, $2::text || '!' AS shout")
        eq([a.name for a in stmt.get_attributes()], ["doubled", "shout"], "prepared statement attributes")
        eq([t.name for t in stmt.get_parameters()], ["int4", "text"], "prepared statement parameter types")
        for i in range(300):
            row = await stmt.fetchrow(i, f"n{i}")
            eq((row["doubled"], row["shout"]), (i * 2, f"n{i}!"), f"prepared row {i}")
        insert = await conn.prepare("INSERT INTO apg_items (id, v, n) VALUES ($1, $2, $3)")
        for i in range(200):
            await insert.fetch(i, f"v{i}", Decimal(i) / 8)
        lookup = await conn.prepare("SELECT v, n FROM apg_items WHERE id = $1")
        for i in range(0, 200, 7):
            eq(tuple(await lookup.fetchrow(i)), (f"v{i}", Decimal(i) / 8), f"lookup {i}")
        eq(await conn.fetchval("SELECT count(*) FROM apg_items"), 200, "rows inserted by the prepared insert")
        # A prepared statement whose execution fails is still usable afterwards.
        div = await conn.prepare("SELECT 100 / $1::int")
        eq(await div.fetchval(4), 25, "100/4")
        await expect_error(asyncpg.DivisionByZeroError, div.fetchval(0), "100/0")
        eq(await div.fetchval(5), 20, "100/5 after the error")

    with step("binary protocol types"):
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        u = uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        at = datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)
        values = (
            Decimal("-98765432109876543210.0000000001"),
            u,
            {"k": [1, "two", None, {"x": 3.5}]},
            [1, None, -3],
            ["a", "b c", None, "ünï"],
            at,
            2**62,
            b"\x00\xff\x10",
            datetime.date(2000, 2, 29),
            True,
            -0.5,
            datetime.timedelta(days=3, microseconds=7),
        )
        row = await conn.fetchrow(
            "SELECT $1::numeric, $2::uuid, $3::jsonb, $4::int[], $5::text[], $6::timestamptz, $7::int8, "
            "$8::bytea, $9::date, $10::bool, $11::float8, $12::interval",
            *values,
        )
        eq(tuple(row), values, "binary round trip of every type")
        nan = await conn.fetchval("SELECT 'NaN'::numeric")
        check(nan.is_nan(), f"NaN numeric decoded: {nan!r}")
        await conn.execute(
            "INSERT INTO apg_items (id, v, u, doc, tags, at) VALUES ($1, $2, $3, $4, $5, $6)",
            1000, "typed", u, values[2], values[4], at,
        )
        row = await conn.fetchrow("SELECT u, doc, tags, at FROM apg_items WHERE id = 1000")
        eq(tuple(row), (u, values[2], values[4], at), "typed columns read back")
        eq(
            await conn.fetchval("SELECT doc->'k'->3->>'x' FROM apg_items WHERE doc @> $1::jsonb", {"k": [1]}),
            "3.5",
            "jsonb containment with a jsonb parameter",
        )

    with step("copy_records_to_table and copy_from_query"):
        at = datetime.datetime(2024, 6, 1, 8, tzinfo=UTC)
        records = [(i, f"name,{i}" if i % 5 else None, Decimal(i) / 100, at) for i in range(5000)]
        result = await conn.copy_records_to_table("apg_copy", records=records, columns=["id", "name", "amount", "at"])
        eq(result, "COPY 5000", "copy_records_to_table status")
        eq(
            tuple(await conn.fetchrow("SELECT count(*), sum(amount), count(name) FROM apg_copy")),
            (5000, sum(r[2] for r in records), 4000),
            "copied rows",
        )
        out = io.BytesIO()
        result = await conn.copy_from_query(
            "SELECT id, name FROM apg_copy WHERE id < $1 ORDER BY id", 6, output=out, format="csv"
        )
        eq(result, "COPY 6", "copy_from_query status")
        eq(out.getvalue(), b'0,\n1,"name,1"\n2,"name,2"\n3,"name,3"\n4,"name,4"\n5,\n', "copy_from_query csv")
        out = io.BytesIO()
        await conn.copy_from_table("apg_copy", output=out, format="binary")
        check(out.getvalue().startswith(b"PGCOPY\n\xff\r\n\x00"), "binary COPY signature")
        await conn.execute("CREATE TABLE apg_copy2 (LIKE apg_copy)")
        out.seek(0)
        eq(await conn.copy_to_table("apg_copy2", source=out, format="binary"), "COPY 5000", "binary copy back in")
        eq(
            await conn.fetchval("SELECT count(*) FROM (SELECT * FROM apg_copy EXCEPT SELECT * FROM apg_copy2) d"),
            0,
            "binary copy round trip is exact",
        )

    with step("transaction blocks with rollback and savepoints"):
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO apg_items (id, v) VALUES (2000, 'rolled back')")
                raise RuntimeError("abort the transaction")
        except RuntimeError:
            pass
        eq(await conn.fetchval("SELECT count(*) FROM apg_items WHERE id = 2000"), 0, "rolled back by the block")
        async with conn.transaction():
            await conn.execute("INSERT INTO apg_items (id, v) VALUES (2001, 'outer')")
            try:
                async with conn.transaction():  # savepoint
                    await conn.execute("INSERT INTO apg_items (id, v) VALUES (2002, 'inner')")
                    await conn.execute("INSERT INTO apg_items (id, v) VALUES (2001, 'dup')")
            except asyncpg.UniqueViolationError as e:
                eq(e.sqlstate, "23505", "sqlstate of the unique violation")
                eq(e.constraint_name, "apg_items_pkey", "constraint name")
            eq(await conn.fetchval("SELECT count(*) FROM apg_items WHERE id IN (2001, 2002)"), 1, "inside outer")
        eq(
            [r[0] for r in await conn.fetch("SELECT id FROM apg_items WHERE id >= 2000 AND id < 3000 ORDER BY id")],
            [2001],
            "savepoint rolled back only the inner block",
        )
        tr = conn.transaction(isolation="serializable", readonly=True)
        await tr.start()
        eq(await conn.fetchval("SHOW transaction_isolation"), "serializable", "serializable transaction")
        await expect_error(
            asyncpg.ReadOnlySQLTransactionError,
            conn.execute("INSERT INTO apg_items (id) VALUES (2003)"),
            "write in a read-only transaction",
        )
        await tr.rollback()
        eq(await conn.fetchval("SELECT 7"), 7, "usable after the failed read-only transaction")

    with step("fetch with many rows; cursors"):
        rows = await conn.fetch("SELECT g, md5(g::text) AS h, g::numeric / 3 AS third FROM generate_series(1, 100000) g")
        eq(len(rows), 100000, "row count")
        eq(rows[-1]["g"], 100000, "last row")
        eq(rows[12344]["h"], hashlib.md5(b"12345").hexdigest(), "md5 column of row 12345")
        eq(sum(r["g"] for r in rows), 100000 * 100001 // 2, "sum of ids")
        eq(rows[2]["third"], Decimal(3) / Decimal(3), "numeric column")
        async with conn.transaction():
            seen = [r["g"] async for r in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=64)]
            eq(seen, list(range(1, 1001)), "async cursor with prefetch 64")
            cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
            eq([r[0] for r in await cur.fetch(5)], [1, 2, 3, 4, 5], "cursor.fetch(5)")
            await cur.forward(10)
            eq((await cur.fetchrow())[0], 16, "cursor after forward(10)")
        await conn.executemany("INSERT INTO apg_items (id, v) VALUES ($1, $2)", [(i, f"em{i}") for i in range(4000, 4500)])
        eq(await conn.fetchval("SELECT count(*) FROM apg_items WHERE v LIKE 'em%'"), 500, "executemany")

    with step("a cancel lands only on the statement it was sent for"):
        # asyncpg answers a failing COPY generator with CopyFail plus a
        # CancelRequest, and waits for the cancel connection to close before
        # its next statement. A proxy that closes that connection before the
        # backend was signalled cancels the *next* statement instead (seen 15
        # in 200 through shardgate until the cancel was forwarded first).
        # A temporary table keeps the backend attached to this client, as in
        # asyncpg's own test, so the cancel finds it.
        await conn.execute("CREATE TEMP TABLE apg_cancel (a bytea)")

        async def failing_records():
            yield (b"x" * 524288,)
            raise ValueError("generator failed")

        for i in range(100):
            await expect_error(ValueError, conn.copy_records_to_table("apg_cancel", records=failing_records()),
                               f"COPY generator failure {i}")
            eq(conn.is_in_transaction(), False, f"not in a transaction after the failed COPY {i}")
            eq(await conn.fetchval("SELECT count(*) FROM apg_cancel"), 0, f"statement after the cancel {i}")
        # A statement cancelled by the client's timeout; the next one runs.
        for i in range(20):
            await expect_error(asyncio.TimeoutError, conn.fetchval("SELECT pg_sleep(10)", timeout=0.05),
                               f"statement timed out {i}")
            eq(await conn.fetchval("SELECT $1::int + 1", i), i + 1, f"statement after a timeout {i}")

    with step("pool connections released (reset query) more often than shardgate has backends"):
        # asyncpg runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`
        # on every pool release. None of it leaves session state behind, so in
        # transaction pooling it must not pin a backend. shardgate's statement
        # scan (src/frontend/session.rs scan_statement) matches "listen" inside
        # "UNLISTEN" and pins the backend to the idle client for good: with 4
        # backends per shard, the 5th release waits for a backend and fails.
        probe = await asyncpg.create_pool(dsn, min_size=6, max_size=6, timeout=10, command_timeout=30)
        held = [await probe.acquire() for _ in range(6)]
        for c in held:
            eq(await c.fetchval("SELECT 1"), 1, "query on a probe connection")
        release_error = None
        for c in held:
            try:
                await probe.release(c)
            except Exception as e:  # noqa: BLE001
                release_error = f"{type(e).__name__}: {e}"
                break  # every further release would wait out the checkout timeout too
        # asyncpg's reset query (advisory_unlock_all; CLOSE ALL; UNLISTEN *; RESET ALL)
        # must not pin backends: 6 releases on 4 backends all succeed.
        check(release_error is None, f"releasing 6 asyncpg pool connections failed: {release_error}")
        probe.terminate()

    with step("pool of 10: 200 concurrent queries with their own prepared statements"):
        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10, timeout=10, command_timeout=60)

        async def job(i):
            k = i % 25  # 25 different statements, prepared on whichever connections run them
            async with pool.acquire() as c:
                stmt = await c.prepare(f"SELECT $1::int + {k} AS v, $2::text AS t, pg_sleep(0.001)::text AS s")
                for round_ in range(5):
                    row = await stmt.fetchrow(i * 10 + round_, f"job{i}")
                    if (row["v"], row["t"]) != (i * 10 + round_ + k, f"job{i}"):
                        raise AssertionError(f"job {i} round {round_}: got {tuple(row)}")
                # asyncpg's implicit statement cache: the same SQL from every job.
                got = await c.fetchval("SELECT v FROM apg_items WHERE id = $1", i % 200)
                if got != f"v{i % 200}":
                    raise AssertionError(f"job {i}: cached-statement lookup got {got!r}")
                if i % 10 == 0:
                    async with c.transaction():
                        await c.execute("INSERT INTO apg_items (id, v) VALUES ($1, $2)", 10000 + i, f"pool{i}")
                        await c.fetchval("SELECT count(*) FROM apg_items WHERE id = $1", 10000 + i)
            return i

        done = await asyncio.wait_for(asyncio.gather(*(job(i) for i in range(200))), timeout=90)
        eq(sorted(done), list(range(200)), "every job finished")
        eq(await pool.fetchval("SELECT count(*) FROM apg_items WHERE id >= 10000"), 20, "rows from the pool jobs")
        # Pool-level helpers run on whatever connection is free.
        vals = await asyncio.gather(*(pool.fetchval("SELECT $1::int * $1::int", i) for i in range(200)))
        eq(vals, [i * i for i in range(200)], "pool.fetchval squares")
        await pool.close()

    await conn.close()


if __name__ == "__main__":
    main("asyncpg", run)
