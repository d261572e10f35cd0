"""asyncpg over a sharded table: cursors (Execute with a row limit,
prefetch, fetch(n), fetchrow, forward = SQL MOVE on the portal) with other
statements of the transaction between two fetches, and executemany inside a
transaction (one extended batch whose rows go to several shards)."""

import asyncpg

from common import check, eq, main, step


async def run(dsn):
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)

    with step("schema and rows"):
        await conn.execute("CREATE TABLE cur_items (id int8 PRIMARY KEY, v text)")
        await conn.executemany(
            "INSERT INTO cur_items VALUES ($1, $2)", [(i, f"v{i}") for i in range(1, 1001)]
        )
        eq(await conn.fetchval("SELECT count(*) FROM cur_items"), 1000, "rows loaded")

    with step("iterating a cursor with prefetch 50 (Execute with a row limit)"):
        async with conn.transaction():
            ids = [r["id"] async for r in conn.cursor("SELECT id FROM cur_items ORDER BY id", prefetch=50)]
        eq(ids, list(range(1, 1001)), "every row once, in order")

    with step("fetch, fetchrow, forward and other statements between fetches"):
        async with conn.transaction():
            cur = await conn.cursor("SELECT id, v FROM cur_items WHERE id > $1 ORDER BY id", 500)
            first = await cur.fetch(10)
            eq([r["id"] for r in first], list(range(501, 511)), "first part")
            row = await cur.fetchrow()
            eq((row["id"], row["v"]), (511, "v511"), "fetchrow")
            moved = await cur.forward(100)
            eq(moved, 100, "forward(100) skipped 100 rows")
            eq(await conn.fetchval("SELECT count(*) FROM cur_items WHERE id <= $1", 500), 500,
               "another statement between two fetches")
            more = await cur.fetch(5)
            eq([r["id"] for r in more], list(range(612, 617)), "the part after the skipped rows")
            rest = await cur.fetch(1000)
            eq([r["id"] for r in rest], list(range(617, 1001)), "the rest")
            eq(await cur.fetch(10), [], "nothing after the end")

    with step("an aggregate through a cursor"):
        async with conn.transaction():
            groups = [tuple(r) async for r in conn.cursor(
                "SELECT id % 10 AS g, count(*) AS n FROM cur_items GROUP BY 1 ORDER BY 1", prefetch=3)]
        eq(groups, [(g, 100) for g in range(10)], "ten groups of 100")

    with step("executemany inside a transaction: rows on every shard, committed together"):
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO cur_items VALUES ($1, $2)", [(i, f"t{i}") for i in range(2001, 2101)]
            )
            eq(await conn.fetchval("SELECT count(*) FROM cur_items WHERE id > 2000"), 100,
               "visible inside the transaction")
        eq(await conn.fetchval("SELECT count(*) FROM cur_items WHERE id > 2000"), 100, "committed")

    with step("a failing executemany inside a transaction leaves nothing"):
        try:
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO cur_items VALUES ($1, $2)",
                    [(i, "x") for i in range(3001, 3050)] + [(3001, "duplicate")],
                )
        except asyncpg.UniqueViolationError:
            check(True, "duplicate key reported")
        else:
            raise AssertionError("the duplicate key was not reported")
        eq(await conn.fetchval("SELECT count(*) FROM cur_items WHERE id > 3000"), 0, "rolled back")

    await conn.close()


if __name__ == "__main__":
    main("asyncpg over shards", run)
