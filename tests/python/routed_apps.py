"""What an application meets in its first hour, with routing on over three
shards (issue #14): an ORM flush and bulk insert into a sharded table
(SQLAlchemy binds Python ints as binary int2 under `::BIGINT` casts), row
locks, JSONB, an async engine on asyncpg, asyncpg's pool reset (`CLOSE ALL`,
`pg_advisory_unlock_all()`, `UNLISTEN *`, `RESET ALL` at every release),
psycopg's `DEALLOCATE ALL`, server-side cursors (`DECLARE`/`FETCH`/`MOVE`),
an error inside a transaction (25P02 afterwards), and an `executemany` that
fails half-way (nothing of it stays, as with one Postgres)."""

import asyncio

import asyncpg
import psycopg
import sqlalchemy as sa
from sqlalchemy import BigInteger, Integer, String, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from common import check, eq, main, raises, step


class Base(DeclarativeBase):
    pass


class Employee(Base):
    """Sharded by id in the test's map."""

    __tablename__ = "ra_employee"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    department: Mapped[str] = mapped_column(String(40))
    salary: Mapped[int] = mapped_column(Integer)
    profile: Mapped[dict] = mapped_column(JSONB, default=dict)


def sa_url(dsn, driver):
    scheme, rest = dsn.split("://", 1)
    return f"postgresql+{driver}://{rest}"


async def async_engine_steps(dsn):
    engine = create_async_engine(sa_url(dsn, "asyncpg"))
    async with AsyncSession(engine) as session:
        session.add(Employee(id=1001, name="async", department="ops", salary=10, profile={"a": 1}))
        await session.commit()
        got = await session.get(Employee, 1001)
        eq((got.name, got.profile), ("async", {"a": 1}), "async engine round trip")
    await engine.dispose()


async def asyncpg_steps(dsn):
    conn = await asyncpg.connect(dsn, timeout=10, command_timeout=60)
    await conn.execute("CREATE TABLE ra_replicated (id int8 PRIMARY KEY, b int)")

    with step("asyncpg executemany failing half-way leaves nothing (sharded and replicated)"):
        for table in ("ra_employee", "ra_replicated"):
            cols = "(id, name, department, salary, profile)" if table == "ra_employee" else "(id, b)"
            vals = "($1, 'x', 'd', 1, '{}')" if table == "ra_employee" else "($1, 0)"
            before = await conn.fetchval(f"SELECT count(*) FROM {table}")
            try:
                await conn.executemany(f"INSERT INTO {table} {cols} VALUES {vals}",
                                       [(2001,), (2002,), (2002,), (2003,)])
                check(False, f"{table}: the duplicate key was not reported")
            except asyncpg.UniqueViolationError:
                pass
            eq(await conn.fetchval(f"SELECT count(*) FROM {table}"), before,
               f"{table}: no row of the failed batch stayed")
        await conn.executemany("INSERT INTO ra_replicated (id, b) VALUES ($1, $2)",
                               [(i, i) for i in range(1, 6)])
        eq(await conn.fetchval("SELECT sum(b) FROM ra_replicated"), 15, "a good batch commits")

    with step("asyncpg pool: 20 acquire/release cycles per connection (pool reset at each release)"):
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
        for i in range(40):
            async with pool.acquire() as con:
                eq(await con.fetchval("SELECT salary FROM ra_employee WHERE id = $1", 1), 100,
                   "a routed read from a pooled connection")
                eq(await con.fetchval("SELECT $1::int", i), i, "an unrouted read")
        await pool.close()
    await conn.close()


def run(dsn):
    engine = sa.create_engine(sa_url(dsn, "psycopg"))
    with step("schema through shardgate"):
        Base.metadata.create_all(engine)

    with step("SQLAlchemy ORM flush into a sharded table (binary int2 keys)"):
        with Session(engine) as session:
            session.add_all([
                Employee(id=i, name=f"e{i}", department=f"d{i % 3}", salary=100 * i, profile={"level": i})
                for i in range(1, 21)
            ])
            session.commit()
            eq(session.get(Employee, 7).name, "e7", "get by primary key")

    with step("SQLAlchemy bulk_insert_mappings, with_for_update, JSONB"):
        with Session(engine) as session:
            session.bulk_insert_mappings(Employee, [
                dict(id=i, name=f"b{i}", department="bulk", salary=1, profile={"bulk": True})
                for i in range(100, 130)
            ])
            session.commit()
            row = session.execute(select(Employee).where(Employee.id == 105).with_for_update()).scalar_one()
            row.salary = 555
            session.commit()
            eq(session.get(Employee, 105).salary, 555, "locked row updated")
            eq(session.execute(select(sa.func.count()).select_from(Employee)).scalar(), 50, "rows over all shards")
            found = session.execute(
                select(Employee.id).where(Employee.id == 3).where(Employee.profile["level"].astext == "3")
            ).scalars().all()
            eq(found, [3], "JSONB path filter")

    with step("SQLAlchemy async engine on asyncpg"):
        asyncio.run(async_engine_steps(dsn))

    asyncio.run(asyncpg_steps(dsn))

    with psycopg.connect(dsn, autocommit=True) as conn:
        with step("an error inside a transaction aborts it (25P02 afterwards)"):
            conn.execute("BEGIN")
            raises(psycopg.errors.SyntaxError, lambda: conn.execute("INVALID SQL"), "syntax error")
            raises(psycopg.errors.InFailedSqlTransaction, lambda: conn.execute("SELECT 1"),
                   "statement after the error")
            eq(conn.info.transaction_status, psycopg.pq.TransactionStatus.INERROR, "status INERROR")
            conn.execute("ROLLBACK")

        with step("DEALLOCATE ALL and CLOSE ALL (psycopg, asyncpg pool reset)"):
            for i in range(3):
                conn.execute("SELECT salary FROM ra_employee WHERE id = %s", (i + 1,), prepare=True)
            conn.execute("DEALLOCATE ALL")
            conn.execute("CLOSE ALL")
            # (A new text: psycopg before 3.3 does not notice a user's DEALLOCATE ALL.)
            eq(conn.execute("SELECT salary FROM ra_employee WHERE id = %s::int8", (2,), prepare=True).fetchone(),
               (200,), "a named statement prepared after DEALLOCATE ALL")

        with step("server-side cursor on one shard (DECLARE, FETCH, MOVE, CLOSE)"):
            with conn.transaction():
                with conn.cursor(name="ra_cur") as cur:
                    cur.execute("SELECT id, name FROM ra_employee WHERE id = %s", (5,))
                    eq(cur.fetchall(), [(5, "e5")], "rows through a named cursor")
            with conn.transaction():
                conn.execute("DECLARE c2 CURSOR FOR SELECT generate_series(1, 10) AS n FROM ra_employee WHERE id = 1")
                eq(conn.execute("FETCH 2 FROM c2").fetchall(), [(1,), (2,)], "FETCH 2")
                conn.execute("MOVE 3 IN c2")
                eq(conn.execute("FETCH NEXT FROM c2").fetchall(), [(6,)], "MOVE then FETCH")
                conn.execute("CLOSE c2")


if __name__ == "__main__":
    main("routed applications", run)
