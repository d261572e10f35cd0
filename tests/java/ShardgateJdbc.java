// pgjdbc against a table sharded over several shards (run by
// tests/jdbc_client.rs, against Postgres directly and through shardgate):
// batch inserts with autocommit off (one extended batch over several shards
// inside a transaction), ResultSets read with a fetch size (a multi-shard
// portal fetched in parts), another statement between two fetches, a
// failing batch rolled back, server-prepared statements (prepareThreshold).
// Prints one line per check; exits 1 on the first failure.

import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;

public class ShardgateJdbc {
    static int checks = 0;

    static void eq(Object got, Object want, String what) {
        checks++;
        if (!want.equals(got)) {
            throw new AssertionError(what + ": expected " + want + ", got " + got);
        }
        System.out.println("  ok  " + what);
    }

    static long count(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        try (Connection c = DriverManager.getConnection(url)) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE jitems (id bigint PRIMARY KEY, v text)");
            }

            // Batch insert with autocommit off: Bind/Execute per row, one Sync.
            c.setAutoCommit(false);
            try (PreparedStatement p = c.prepareStatement("INSERT INTO jitems VALUES (?, ?)")) {
                for (int i = 1; i <= 1000; i++) {
                    p.setLong(1, i);
                    p.setString(2, "v" + i);
                    p.addBatch();
                }
                int[] counts = p.executeBatch();
                eq(counts.length, 1000, "executeBatch ran 1000 inserts");
            }
            eq(count(c, "SELECT count(*) FROM jitems"), 1000L, "rows visible inside the transaction");
            c.commit();
            eq(count(c, "SELECT count(*) FROM jitems"), 1000L, "rows committed");
            c.commit();

            // A ResultSet read with a fetch size: Execute(portal, 50) per fetch.
            try (Statement s = c.createStatement()) {
                s.setFetchSize(50);
                List<Long> ids = new ArrayList<>();
                try (ResultSet rs = s.executeQuery("SELECT id, v FROM jitems ORDER BY id")) {
                    while (rs.next()) {
                        ids.add(rs.getLong(1));
                        if (ids.size() == 120) {
                            // Another statement of the transaction between two fetches.
                            eq(count(c, "SELECT count(*) FROM jitems WHERE id > 500"), 500L,
                               "a query while the ResultSet is open");
                        }
                    }
                }
                List<Long> want = new ArrayList<>();
                for (long i = 1; i <= 1000; i++) want.add(i);
                eq(ids, want, "fetch size 50: every row once, in order");
            }
            c.commit();

            // Server-prepared (prepareThreshold 5): the same query many times.
            try (PreparedStatement p = c.prepareStatement("SELECT v FROM jitems WHERE id = ?")) {
                for (int i = 1; i <= 20; i++) {
                    p.setLong(1, i * 7);
                    try (ResultSet rs = p.executeQuery()) {
                        rs.next();
                        if (!rs.getString(1).equals("v" + (i * 7))) {
                            throw new AssertionError("lookup " + i);
                        }
                    }
                }
                eq(20, 20, "20 executions of a server-prepared lookup");
            }
            // An aggregate over every shard with a fetch size.
            try (PreparedStatement p = c.prepareStatement(
                    "SELECT id % 10 AS g, count(*) FROM jitems GROUP BY 1 ORDER BY 1")) {
                p.setFetchSize(3);
                int groups = 0;
                try (ResultSet rs = p.executeQuery()) {
                    while (rs.next()) {
                        eq(rs.getLong(2), 100L, "group " + rs.getLong(1));
                        groups++;
                    }
                }
                eq(groups, 10, "ten groups through a fetch size of 3");
            }
            c.commit();

            // A failing batch: nothing of it stays.
            try (PreparedStatement p = c.prepareStatement("INSERT INTO jitems VALUES (?, ?)")) {
                for (int i = 2001; i <= 2050; i++) {
                    p.setLong(1, i);
                    p.setString(2, "x");
                    p.addBatch();
                }
                p.setLong(1, 2001);
                p.setString(2, "duplicate");
                p.addBatch();
                try {
                    p.executeBatch();
                    throw new AssertionError("the duplicate key was not reported");
                } catch (BatchUpdateException e) {
                    eq(e.getSQLState(), "23505", "duplicate key reported");
                }
            }
            c.rollback();
            eq(count(c, "SELECT count(*) FROM jitems WHERE id > 2000"), 0L, "failed batch rolled back");
            c.commit();
        }
        System.out.println("jdbc: all " + checks + " checks passed");
    }
}
