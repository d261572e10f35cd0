//! Shared harness of the fan-out tests: a 3-shard database plus an
//! unsharded oracle database holding every row, raw protocol connections to
//! both, and the same request sent to the executor and to the oracle.
//!
//! `via_executor` calls `shardgate::executor::fanout::run` directly with
//! checked-out shard connections; to go through the proxy instead, replace
//! it with a raw `support::wire::Wire` connection to `support::start_proxy`
//! sending the same messages (the `Answer` decoding is shared).
#![allow(dead_code)]

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use shardgate::backend::BackendConnection;
use shardgate::config::{Config, ShardConfig};
use shardgate::executor::fanout::wire::decode_row_description;
use shardgate::executor::fanout::{run, FanoutExecutor, FanoutProtocol, FanoutRequest, ShardConn};
use shardgate::protocol::messages::{command_tag, Bind};
use shardgate::protocol::synth;
use shardgate::protocol::{next_frame, MAX_BACKEND_MESSAGE};
use shardgate::router::{Param, Route, Router, ShardMap};

use crate::support;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Simple,
    ExtText,
    ExtBinary,
}

pub const PROTOS: [Proto; 3] = [Proto::Simple, Proto::ExtText, Proto::ExtBinary];

/// A decoded answer: columns (name, type), DataRow bodies, tag or error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub fields: Vec<(String, u32)>,
    pub rows: Vec<Vec<u8>>,
    pub tag: Option<String>,
    /// (SQLSTATE, message, detail and context: the shard is named there)
    pub error: Option<(String, String, String)>,
    /// CopyData payloads (COPY … TO STDOUT), and whether CopyOutResponse/CopyDone came.
    pub copy: Vec<Vec<u8>>,
    pub copy_started: bool,
    pub copy_done: bool,
    pub notices: usize,
}

impl Answer {
    /// Cell `i` of each row.
    pub fn column(&self, i: usize) -> Vec<Option<Vec<u8>>> {
        self.rows
            .iter()
            .map(|r| cells(r).get(i).cloned().flatten())
            .collect()
    }
    pub fn text(&self, row: usize, col: usize) -> Option<String> {
        cells(self.rows.get(row)?)
            .get(col)
            .cloned()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

pub fn cells(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    support::wire::row_cells(body)
}

/// Decodes backend frames (T, D, C, E) into an Answer.
pub fn decode(bytes: &[u8], answer: &mut Answer) {
    let mut rest = bytes;
    while let Ok(Some((frame, len))) = next_frame(rest, MAX_BACKEND_MESSAGE) {
        match frame.tag {
            b'T' => {
                answer.fields = decode_row_description(frame.body)
                    .unwrap()
                    .into_iter()
                    .map(|f| (f.name, f.type_oid))
                    .collect()
            }
            b'D' => answer.rows.push(frame.body.to_vec()),
            b'd' => answer.copy.push(frame.body.to_vec()),
            b'H' => answer.copy_started = true,
            b'c' => answer.copy_done = true,
            b'N' => answer.notices += 1,
            b'C' => answer.tag = Some(command_tag(frame.body).to_string()),
            b'E' => {
                let get = |k: u8| {
                    shardgate::protocol::messages::error_field_bytes(frame.body)
                        .find(|(c, _)| *c == k)
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                };
                answer.error = Some((
                    get(b'C'),
                    get(b'M'),
                    format!("{}\n{}", get(b'D'), get(b'W')),
                ));
            }
            _ => {}
        }
        rest = &rest[len..];
    }
}

/// The body of a Bind after the two names: text params, result formats.
pub fn bind_rest(params: &[Option<&str>], binary: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i16(0);
    b.put_i16(params.len() as i16);
    for p in params {
        match p {
            None => b.put_i32(-1),
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
        }
    }
    if binary {
        b.put_i16(1);
        b.put_i16(1);
    } else {
        b.put_i16(0);
    }
    b.to_vec()
}

pub struct Fixture {
    pub map: String,
    /// shardgate itself with this map, once `start_proxy` ran, and a raw client.
    pub proxy: Option<(shardgate::server::RunningServer, support::wire::Wire)>,
    pub db: String,
    pub oracle_db: String,
    pub config: Config,
    pub router: Router,
    pub executor: FanoutExecutor,
    pub shards: Vec<BackendConnection>,
    pub oracle: BackendConnection,
}

pub fn shard_config(
    name: &str,
    cluster: &shardgate::devcluster::DevCluster,
    db: &str,
) -> ShardConfig {
    ShardConfig {
        name: name.to_owned(),
        url: cluster.url(db),
        host: cluster.host().to_owned(),
        port: cluster.port(),
        user: "postgres".to_owned(),
        password: None,
        database: db.to_owned(),
    }
}

impl Fixture {
    /// A fresh sharded database and oracle with the given map tables/functions.
    pub async fn new(test: &str, map_extra: &str) -> Fixture {
        let db = support::fresh_db(test);
        let oracle_db = support::fresh_db(&format!("{test}_oracle"));
        let text = support::shard_map(&db, map_extra);
        let config = Config::parse(std::path::Path::new("test-map.yaml"), &text, &|_| None)
            .unwrap_or_else(|e| panic!("map invalid: {e}\n{text}"));
        let router = Router::new(ShardMap::from_config(&config).unwrap());
        let executor = FanoutExecutor::new(&config);
        let mut shards = Vec::new();
        for (i, s) in config.shards.iter().enumerate() {
            shards.push(
                BackendConnection::connect(s, i, Duration::from_secs(10))
                    .await
                    .unwrap(),
            );
        }
        let oracle_cfg = shard_config("oracle", &support::fleet().clusters[0], &oracle_db);
        let oracle = BackendConnection::connect(&oracle_cfg, 0, Duration::from_secs(10))
            .await
            .unwrap();
        Fixture {
            map: text,
            proxy: None,
            db,
            oracle_db,
            config,
            router,
            executor,
            shards,
            oracle,
        }
    }

    /// Runs SQL on the oracle and every shard (schema, replicated data).
    pub async fn everywhere(&self, sql: &str) {
        let fleet = support::fleet();
        let oracle = support::connect(&fleet.clusters[0], &self.oracle_db).await;
        oracle.batch_execute(sql).await.unwrap();
        for c in &fleet.clusters {
            support::connect(c, &self.db)
                .await
                .batch_execute(sql)
                .await
                .unwrap();
        }
    }

    /// The shard a key of `table` lives on.
    pub fn shard_of(&self, table: &str, key_col: &str, key: &str) -> usize {
        match self
            .router
            .route(&format!("SELECT 1 FROM {table} WHERE {key_col} = {key}"))
            .unwrap()
        {
            Route::Single(s) => s,
            other => panic!("key {key} routes to {other:?}"),
        }
    }

    /// Inserts rows (SQL tuples) into the oracle and into the shard each key belongs to.
    pub async fn load(&self, table: &str, key_col: &str, rows: &[(String, String)]) {
        let fleet = support::fleet();
        let mut per_shard: Vec<Vec<&str>> = vec![Vec::new(); fleet.clusters.len()];
        for (key, tuple) in rows {
            per_shard[self.shard_of(table, key_col, key)].push(tuple);
        }
        let all: Vec<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
        let oracle = support::connect(&fleet.clusters[0], &self.oracle_db).await;
        for chunk in all.chunks(500) {
            oracle
                .batch_execute(&format!("INSERT INTO {table} VALUES {}", chunk.join(",")))
                .await
                .unwrap();
        }
        for (i, tuples) in per_shard.iter().enumerate() {
            let c = support::connect(&fleet.clusters[i], &self.db).await;
            for chunk in tuples.chunks(500) {
                c.batch_execute(&format!("INSERT INTO {table} VALUES {}", chunk.join(",")))
                    .await
                    .unwrap();
            }
        }
        let _ = oracle.batch_execute(&format!("ANALYZE {table}")).await;
    }

    pub fn route(&self, sql: &str, params: &[Option<&str>]) -> Route {
        let p: Vec<Param> = params
            .iter()
            .map(|v| v.map_or_else(Param::null, Param::text))
            .collect();
        self.router.route_with_params(sql, &p).unwrap_or(Route::All)
    }

    /// The request as a client would send it to one Postgres.
    pub fn request(sql: &str, params: &[Option<&str>], proto: Proto) -> Vec<u8> {
        let mut b = BytesMut::new();
        match proto {
            Proto::Simple => synth::query(&mut b, sql),
            _ => {
                let mut parse = BytesMut::new();
                parse.put_u8(0);
                parse.put_slice(sql.as_bytes());
                parse.put_u8(0);
                parse.put_i16(0);
                b.put_u8(b'P');
                b.put_i32(4 + parse.len() as i32);
                b.put_slice(&parse);
                let mut bind = BytesMut::new();
                bind.put_slice(&[0, 0]);
                bind.put_slice(&bind_rest(params, proto == Proto::ExtBinary));
                b.put_u8(b'B');
                b.put_i32(4 + bind.len() as i32);
                b.put_slice(&bind);
                b.put_slice(&[b'D', 0, 0, 0, 6, b'P', 0]);
                b.put_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
                synth::sync(&mut b);
            }
        }
        b.to_vec()
    }

    /// Starts shardgate with the fixture's map and connects a raw client.
    pub async fn start_proxy(&mut self) {
        let server = support::start_proxy(&self.map).await;
        let wire = support::wire::Wire::connect(
            server.address.port(),
            "app",
            &server.shared.config.database,
        )
        .await;
        self.proxy = Some((server, wire));
    }

    /// Two more raw clients (after `start_proxy`): one to the oracle
    /// database, one through shardgate, for comparing message streams.
    pub async fn oracle_and_proxy_wires(&self) -> (support::wire::Wire, support::wire::Wire) {
        let oracle = support::wire::Wire::connect(
            support::fleet().clusters[0].port(),
            "postgres",
            &self.oracle_db,
        )
        .await;
        let (server, _) = self.proxy.as_ref().expect("start_proxy first");
        let proxied = support::wire::Wire::connect(server.address.port(), "app", &self.db).await;
        (oracle, proxied)
    }

    /// The same request through shardgate (after `start_proxy`).
    pub async fn via_proxy(&mut self, sql: &str, params: &[Option<&str>], proto: Proto) -> Answer {
        let (_, wire) = self.proxy.as_mut().expect("start_proxy first");
        let msgs = wire.exchange(&Self::request(sql, params, proto), 1).await;
        let mut bytes = Vec::new();
        for m in msgs {
            bytes.push(m.tag);
            bytes.extend_from_slice(&((m.body.len() + 4) as i32).to_be_bytes());
            bytes.extend_from_slice(&m.body);
        }
        let mut answer = Answer::default();
        decode(&bytes, &mut answer);
        answer
    }

    /// The request through shardgate fetched in parts of `part` rows
    /// (Execute with a row limit, then Flush, until CommandComplete or an
    /// error). Every part but the last must have exactly `part` rows and end
    /// with PortalSuspended; the returned answer carries all rows and the
    /// tag with the total count, comparable with a whole fetch.
    pub async fn via_proxy_in_parts(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        proto: Proto,
        part: i32,
    ) -> Result<Answer, String> {
        let (_, wire) = self.proxy.as_mut().expect("start_proxy first");
        let mut request = Self::request(sql, params, proto);
        // Self::request ends with Execute(all) + Sync: ask for a part instead.
        request.truncate(request.len() - 10 - 5);
        request.extend_from_slice(&support::wire::execute("", part));
        request.extend_from_slice(&support::wire::flush());
        wire.send(&request).await;
        let mut bytes = Vec::new();
        let mut in_part = 0;
        let mut total = 0u64;
        loop {
            let m = wire.recv().await.ok_or("connection closed")?;
            match m.tag {
                b'D' => {
                    in_part += 1;
                    total += 1;
                }
                b's' => {
                    if in_part != part {
                        return Err(format!("a part of {in_part} rows, not {part}"));
                    }
                    in_part = 0;
                    let next = [support::wire::execute("", part), support::wire::flush()].concat();
                    wire.send(&next).await;
                    continue;
                }
                _ => {}
            }
            let end = matches!(m.tag, b'C' | b'E');
            let body = if m.tag == b'C' {
                let tag = command_tag(&m.body).to_string();
                let head = tag.rsplit_once(' ').map_or(tag.as_str(), |(h, _)| h);
                let mut b = format!("{head} {total}").into_bytes();
                b.push(0);
                b
            } else {
                m.body
            };
            bytes.push(m.tag);
            bytes.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            bytes.extend_from_slice(&body);
            if end {
                break;
            }
        }
        let ready = wire.exchange(&support::wire::sync(), 1).await;
        if ready.len() != 1 {
            return Err(format!("after the parts, Sync answered {ready:?}"));
        }
        let mut answer = Answer::default();
        decode(&bytes, &mut answer);
        Ok(answer)
    }

    pub async fn via_oracle(&mut self, sql: &str, params: &[Option<&str>], proto: Proto) -> Answer {
        let req = Self::request(sql, params, proto);
        read_answer(&mut self.oracle, &req).await
    }

    /// The same request through the fan-out executor on all shards (or the
    /// shards of the router's route).
    pub async fn via_executor(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        proto: Proto,
    ) -> Answer {
        let route = self.route(sql, params);
        self.via_executor_route(sql, params, proto, &route).await
    }

    pub async fn via_executor_route(
        &mut self,
        sql: &str,
        params: &[Option<&str>],
        proto: Proto,
        route: &Route,
    ) -> Answer {
        let wanted: Vec<usize> = match route {
            Route::Shards(s) => s.iter().copied().collect(),
            Route::Single(s) => vec![*s],
            Route::Split { rows_by_shard } => rows_by_shard.keys().copied().collect(),
            _ => (0..self.shards.len()).collect(),
        };
        let rest = bind_rest(params, proto == Proto::ExtBinary);
        let types = vec![0u32; params.len()];
        let protocol = match proto {
            Proto::Simple => FanoutProtocol::Simple,
            _ => FanoutProtocol::Extended {
                bind: Bind {
                    portal: "",
                    statement: "",
                    rest: &rest,
                },
                param_types: &types,
                describe: true,
                expected_shape: None,
            },
        };
        let mut targets: Vec<ShardConn> = self
            .shards
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| wanted.contains(i))
            .map(|(i, conn)| ShardConn { shard: i, conn })
            .collect();
        let mut out = BytesMut::new();
        let mut client: Vec<u8> = Vec::new();
        let result = run(
            &self.executor,
            FanoutRequest {
                sql,
                route,
                protocol,
            },
            &mut targets,
            &mut out,
            &mut client,
        )
        .await;
        client.extend_from_slice(&out);
        let mut answer = Answer::default();
        decode(&client, &mut answer);
        if let Err(e) = result {
            answer.error = Some((
                e.code.to_string(),
                e.message.clone(),
                format!(
                    "{}\n{}",
                    e.detail.clone().unwrap_or_default(),
                    e.extra
                        .iter()
                        .find(|(k, _)| *k == b'W')
                        .map(|(_, v)| v.as_str())
                        .unwrap_or_default()
                ),
            ));
        }
        for t in &targets {
            assert!(!t.conn.is_broken(), "{sql}: shard {} left broken", t.shard);
        }
        answer
    }
}

/// Sends a request on a raw connection and decodes the answer up to ReadyForQuery.
pub async fn read_answer(conn: &mut BackendConnection, req: &[u8]) -> Answer {
    conn.write_all(req).await.unwrap();
    let mut buf = BytesMut::new();
    let mut all = Vec::new();
    loop {
        let n = conn.read_buf(&mut buf).await.unwrap();
        assert!(n > 0, "oracle closed");
        while let Some((frame, len)) = next_frame(&buf, MAX_BACKEND_MESSAGE).unwrap() {
            let tag = frame.tag;
            let status = frame.body.first().copied();
            let bytes = buf.split_to(len);
            if tag == b'Z' {
                conn.set_transaction_status(status.unwrap());
                let mut a = Answer::default();
                decode(&all, &mut a);
                return a;
            }
            all.extend_from_slice(&bytes);
        }
    }
}
