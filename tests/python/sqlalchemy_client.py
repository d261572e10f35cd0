"""SQLAlchemy 2: ORM and Core with the psycopg (3) driver, then briefly with asyncpg."""

import asyncio
import datetime
from decimal import Decimal
from typing import List, Optional

import sqlalchemy as sa
from sqlalchemy import ForeignKey, Numeric, String, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from common import check, eq, main, step


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    born: Mapped[Optional[datetime.date]]
    books: Mapped[List["Book"]] = relationship(back_populates="author", cascade="all, delete-orphan", order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    author_id: Mapped[int] = mapped_column(ForeignKey("sa_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


events = sa.Table(
    "sa_events",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("payload", sa.JSON),
    sa.Column("at", sa.DateTime(timezone=True), server_default=func.now()),
)


def url_for(dsn, driver):
    return f"postgresql+{driver}://{dsn.split('://', 1)[1]}"


def run(dsn):
    engine = sa.create_engine(url_for(dsn, "psycopg"), pool_size=5, max_overflow=0, pool_pre_ping=True)

    with step("create_all (reflection queries, DDL)"):
        Base.metadata.create_all(engine)
        inspector = sa.inspect(engine)
        eq(sorted(t for t in inspector.get_table_names() if t.startswith("sa_")), ["sa_authors", "sa_books", "sa_events"], "tables")
        eq([c["name"] for c in inspector.get_columns("sa_books")], ["id", "title", "price", "author_id"], "columns")
        eq([fk["referred_table"] for fk in inspector.get_foreign_keys("sa_books")], ["sa_authors"], "foreign keys")
        Base.metadata.create_all(engine)  # second time: checks existence, creates nothing

    with step("ORM: add, commit, query, relationship"):
        with Session(engine) as session:
            for a in range(10):
                session.add(
                    Author(
                        name=f"author {a}",
                        born=datetime.date(1950 + a, 1, 1),
                        books=[Book(title=f"book {a}.{b}", price=Decimal(f"{a}.{b}0")) for b in range(a % 4 + 1)],
                    )
                )
            session.commit()
        with Session(engine) as session:
            author = session.scalars(select(Author).where(Author.name == "author 3")).one()
            eq([b.title for b in author.books], ["book 3.0", "book 3.1", "book 3.2", "book 3.3"], "lazy-loaded books")
            eq(author.books[1].author.name, "author 3", "back reference")
            authors = session.scalars(select(Author).options(selectinload(Author.books)).order_by(Author.id)).all()
            eq([len(a.books) for a in authors], [a % 4 + 1 for a in range(10)], "selectinload book counts")
            rows = session.execute(
                select(Author.name, func.count(Book.id), func.sum(Book.price))
                .join(Author.books)
                .group_by(Author.name)
                .having(func.count(Book.id) > 3)
                .order_by(Author.name)
            ).all()
            eq(
                rows,
                [("author 3", 4, Decimal("12.60")), ("author 7", 4, Decimal("28.60"))],
                "join, group by, having",
            )
            book = session.get(Book, 1)
            book.price = Decimal("99.99")
            session.delete(authors[9])
            session.commit()
            eq(session.scalar(select(func.count()).select_from(Book)), 23 - 2, "books after cascade delete")
            eq(session.get(Book, 1).price, Decimal("99.99"), "updated price")

    with step("ORM: rollback on IntegrityError, session usable afterwards"):
        with Session(engine) as session:
            session.add(Author(name="author 1"))
            try:
                session.commit()
                check(False, "duplicate name was committed")
            except IntegrityError as e:
                eq(e.orig.sqlstate, "23505", "sqlstate of the IntegrityError")
                session.rollback()
            session.add(Book(title="orphan", price=Decimal(1), author_id=424242))
            try:
                session.flush()
                check(False, "orphan book was flushed")
            except IntegrityError as e:
                eq(e.orig.sqlstate, "23503", "sqlstate of the foreign key violation")
                session.rollback()
            session.add(Author(name="author new"))
            session.commit()
            eq(session.scalar(select(func.count()).select_from(Author)), 10, "authors after errors and one insert")
        with Session(engine) as session:
            session.add(Author(name="never committed"))
            session.flush()
            eq(session.scalar(select(func.count()).where(Author.name == "never committed")), 1, "flushed, visible")
            session.rollback()
            eq(session.scalar(select(func.count()).where(Author.name == "never committed")), 0, "rolled back")

    with step("text() with bound parameters"):
        with engine.connect() as conn:
            eq(conn.execute(text("SELECT :x + 1"), {"x": 41}).scalar(), 42, "SELECT :x + 1")
            rows = conn.execute(
                text("SELECT name FROM sa_authors WHERE born >= :since AND name LIKE :pat ORDER BY name"),
                {"since": datetime.date(1955, 1, 1), "pat": "author %"},
            ).scalars().all()
            eq(rows, ["author 5", "author 6", "author 7", "author 8"], "text() with date and LIKE parameters")
            for i in range(10):  # psycopg auto-prepares repeated statements
                eq(conn.execute(text("SELECT CAST(:v AS text) || 'x'"), {"v": str(i)}).scalar(), f"{i}x", "repeated")

    with step("Core: insert many, select, update, delete"):
        with engine.begin() as conn:
            result = conn.execute(
                sa.insert(events).returning(events.c.id),
                [{"id": i, "kind": f"k{i % 3}", "payload": {"i": i, "tags": ["a"] * (i % 3)}} for i in range(1, 1001)],
            )
            eq(sorted(r[0] for r in result), list(range(1, 1001)), "insertmanyvalues RETURNING ids")
            conn.execute(sa.insert(events), [{"id": i, "kind": "plain"} for i in range(2001, 2101)])
        with engine.connect() as conn:
            counts = conn.execute(select(events.c.kind, func.count()).group_by(events.c.kind).order_by(events.c.kind)).all()
            eq(counts, [("k0", 333), ("k1", 334), ("k2", 333), ("plain", 100)], "counts per kind")
            row = conn.execute(select(events).where(events.c.id == 5)).one()
            eq(row.payload, {"i": 5, "tags": ["a", "a"]}, "json payload")
            check(isinstance(row.at, datetime.datetime) and row.at.tzinfo is not None, f"server default timestamptz {row.at!r}")
            conn.execute(sa.update(events).where(events.c.kind == "plain").values(kind="updated"))
            conn.execute(sa.delete(events).where(events.c.id > 2050))
            conn.rollback()
            eq(conn.execute(select(func.count()).where(events.c.kind == "plain")).scalar(), 100, "rolled back update")
    engine.dispose()

    with step("asyncpg driver via create_async_engine"):
        asyncio.run(run_async(dsn))


async def run_async(dsn):
    engine = create_async_engine(url_for(dsn, "asyncpg"), pool_size=4, max_overflow=0)
    async with AsyncSession(engine) as session:
        authors = (await session.scalars(select(Author).options(selectinload(Author.books)).order_by(Author.id))).all()
        eq(len(authors), 10, "authors through asyncpg")
        eq([b.title for b in authors[3].books], ["book 3.0", "book 3.1", "book 3.2", "book 3.3"], "books through asyncpg")
        session.add(Author(name="async author", books=[Book(title="async book", price=Decimal("1.50"))]))
        await session.commit()
        session.add(Author(name="async author"))
        try:
            await session.commit()
            check(False, "duplicate committed through asyncpg")
        except IntegrityError as e:
            eq(e.orig.sqlstate, "23505", "sqlstate through the asyncpg driver")
            await session.rollback()

    async def query(i):
        async with engine.connect() as conn:
            return (await conn.execute(text("SELECT CAST(:i AS int) * 2"), {"i": i})).scalar()

    eq(await asyncio.gather(*(query(i) for i in range(40))), [i * 2 for i in range(40)], "40 concurrent async queries")
    async with engine.begin() as conn:
        eq(
            (await conn.execute(select(Book.price).join(Author).where(Author.name == "async author"))).scalar_one(),
            Decimal("1.50"),
            "book of the async author",
        )
    await engine.dispose()


if __name__ == "__main__":
    main("sqlalchemy", run)
