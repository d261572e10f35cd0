"""A user-defined type over three shards, where it has a different OID on
each (issue #14): asyncpg introspects the OIDs a RowDescription names and
psycopg declares a registered enum's OID in Parse; both must see one set of
OIDs (the first shard's), whichever shard answers."""

import asyncio
import enum

import asyncpg
import psycopg
from psycopg.types.enum import EnumInfo, register_enum

from common import eq, main, step


class Mood(enum.Enum):
    sad = "sad"
    ok = "ok"
    happy = "happy"


async def asyncpg_steps(dsn):
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)
    with step("asyncpg: enum and enum[] columns, binary, rows on every shard"):
        await conn.executemany(
            "INSERT INTO rt_items (id, m, ms) VALUES ($1, $2, $3)",
            [(i, "ok", ["sad", "happy"]) for i in range(1, 13)],
        )
        for i in range(1, 13):
            # A new connection each time: its type cache starts empty.
            fresh = await asyncpg.connect(dsn, timeout=10)
            row = await fresh.fetchrow("SELECT m, ms FROM rt_items WHERE id = $1", i)
            eq((row["m"], row["ms"]), ("ok", ["sad", "happy"]), f"row {i}")
            await fresh.close()
        eq(await conn.fetchval("SELECT count(*) FROM rt_items WHERE m = $1", "ok"), 12, "enum parameter")
    await conn.close()


def run(dsn):
    asyncio.run(asyncpg_steps(dsn))
    with step("psycopg: a registered enum (its OID declared in Parse) on every shard"):
        for i in range(1, 13):
            with psycopg.connect(dsn) as conn:
                register_enum(EnumInfo.fetch(conn, "rt_mood"), conn, Mood)
                conn.execute("UPDATE rt_items SET m = %s WHERE id = %s", (Mood.happy, i))
                eq(conn.execute("SELECT m, ms FROM rt_items WHERE id = %s", (i,)).fetchone(),
                   (Mood.happy, [Mood.sad, Mood.happy]), f"row {i} (text)")
                eq(conn.execute("SELECT m FROM rt_items WHERE id = %s", (i,), binary=True).fetchone(),
                   (Mood.happy,), f"row {i} (binary)")


if __name__ == "__main__":
    main("user-defined types", run)
