"""asyncpg cursors over a sharded table: Execute with a row limit (prefetch),
fetch(n), fetchrow and forward (SQL MOVE on the portal), with other
statements of the transaction between two fetches."""

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

    await conn.close()


if __name__ == "__main__":
    main("asyncpg cursors", run)
