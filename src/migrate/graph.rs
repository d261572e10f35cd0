//! The revision graph, with Alembic's rules.
//!
//! Edges: `down_revision` (parent → child; several parents = a merge) and
//! `depends_on` (a dependency that must be applied first but does not merge
//! branches: like Alembic, it never removes the dependency's row from the
//! version table). Heads and bases are computed from `down_revision` only.
//! Branch labels are inherited by descendants and by ancestors up to the
//! nearest branch or merge point, as Alembic does, so `label@head` finds the
//! head of that branch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use super::revision::Revision;

/// A graph or target-resolution error. Messages follow Alembic's wording
/// where Alembic has one, so its users recognise them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("revision {id} is defined twice: {first} and {second}")]
    Duplicate {
        id: String,
        first: String,
        second: String,
    },
    #[error("{file}: down_revision {missing} does not exist")]
    MissingParent { file: String, missing: String },
    #[error("{file}: depends_on `{missing}` is not a revision or branch label")]
    MissingDependency { file: String, missing: String },
    #[error("branch label `{label}` is declared twice: {first} and {second}")]
    DuplicateLabel {
        label: String,
        first: String,
        second: String,
    },
    #[error("cycle in the revision graph: {}", files.join(" -> "))]
    Cycle { files: Vec<String> },
    #[error("Multiple head revisions are present for given argument '{argument}'; please specify a specific target revision, '<branchname>@head' to narrow to a specific head, or 'heads' for all heads")]
    MultipleHeads { argument: String },
    #[error("Multiple heads are present; please specify the head revision on which the new revision should be based, or perform a merge.")]
    MultipleHeadsForNew,
    #[error("No such revision or branch '{0}'")]
    NoSuchRevision(String),
    #[error("Ambiguous revision '{prefix}': multiple revisions start with it: {}", candidates.join(", "))]
    AmbiguousPrefix {
        prefix: String,
        candidates: Vec<String>,
    },
    #[error("Revision {revision} is not a member of branch '{label}'")]
    NotInBranch { revision: String, label: String },
    #[error("Relative revision {spec} didn't produce {steps} migrations")]
    RelativeOutOfRange { spec: String, steps: usize },
    #[error("Relative revision {spec} is ambiguous: {revision} has several {direction} ({}); name the revision instead", options.join(", "))]
    RelativeAmbiguous {
        spec: String,
        revision: String,
        direction: &'static str,
        options: Vec<String>,
    },
    #[error("Destination {target} is not a valid downgrade target from current head(s)")]
    NotADowngradeTarget { target: String },
    #[error("revision {0} is applied but its folder does not exist in the migrations directory")]
    UnknownApplied(String),
}

/// What a target identifier names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// These revisions (as heads to reach / return to).
    Revisions(Vec<String>),
    /// Nothing applied (`base`).
    Base,
    /// Remove the branch with this label entirely (`label@base`).
    BranchBase(String),
}

/// The revision graph of one migrations folder.
#[derive(Debug, Clone)]
pub struct Graph {
    revisions: BTreeMap<String, Revision>,
    children: HashMap<String, Vec<String>>,
    /// Resolved `depends_on` ids per revision.
    deps: HashMap<String, Vec<String>>,
    dependents: HashMap<String, Vec<String>>,
    /// Label → the revision that declares it.
    labels: BTreeMap<String, String>,
    /// Revision → every label it carries (declared or inherited).
    carried: HashMap<String, BTreeSet<String>>,
    /// Parents (and dependencies) before children; deterministic.
    order: Vec<String>,
    heads: Vec<String>,
    bases: Vec<String>,
}

fn file_of(r: &Revision) -> String {
    r.up_path.display().to_string()
}

impl Graph {
    /// Builds and checks the graph: duplicate ids and labels, missing parents
    /// and dependencies, cycles (each error names the files).
    pub fn build(list: Vec<Revision>) -> Result<Graph, GraphError> {
        let mut revisions: BTreeMap<String, Revision> = BTreeMap::new();
        for r in list {
            if let Some(existing) = revisions.get(&r.id) {
                return Err(GraphError::Duplicate {
                    id: r.id.clone(),
                    first: existing.dir.display().to_string(),
                    second: r.dir.display().to_string(),
                });
            }
            revisions.insert(r.id.clone(), r);
        }
        let mut labels = BTreeMap::new();
        for r in revisions.values() {
            for label in &r.branch_labels {
                if let Some(first) = labels.insert(label.clone(), r.id.clone()) {
                    return Err(GraphError::DuplicateLabel {
                        label: label.clone(),
                        first: file_of(&revisions[&first]),
                        second: file_of(r),
                    });
                }
            }
        }
        let mut children: HashMap<String, Vec<String>> = HashMap::new();
        for r in revisions.values() {
            for parent in &r.down_revisions {
                if !revisions.contains_key(parent) {
                    return Err(GraphError::MissingParent {
                        file: file_of(r),
                        missing: parent.clone(),
                    });
                }
                children
                    .entry(parent.clone())
                    .or_default()
                    .push(r.id.clone());
            }
        }
        let mut deps: HashMap<String, Vec<String>> = HashMap::new();
        let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
        for r in revisions.values() {
            for dep in &r.depends_on {
                let resolved = if let Some(id) = labels.get(dep) {
                    Some(id.clone())
                } else {
                    let matches: Vec<&String> = revisions
                        .keys()
                        .filter(|id| id.starts_with(dep.as_str()))
                        .collect();
                    (matches.len() == 1 && !dep.is_empty()).then(|| matches[0].clone())
                };
                let Some(id) = resolved else {
                    return Err(GraphError::MissingDependency {
                        file: file_of(r),
                        missing: dep.clone(),
                    });
                };
                deps.entry(r.id.clone()).or_default().push(id.clone());
                dependents.entry(id).or_default().push(r.id.clone());
            }
        }
        let mut graph = Graph {
            heads: revisions
                .keys()
                .filter(|id| !children.contains_key(*id))
                .cloned()
                .collect(),
            bases: revisions
                .values()
                .filter(|r| r.down_revisions.is_empty())
                .map(|r| r.id.clone())
                .collect(),
            revisions,
            children,
            deps,
            dependents,
            labels,
            carried: HashMap::new(),
            order: Vec::new(),
        };
        graph.check_cycles()?;
        graph.order = graph.topological();
        graph.carried = graph.propagate_labels();
        Ok(graph)
    }

    /// Loads a folder and builds its graph; all file errors are joined.
    pub fn load(dir: &std::path::Path) -> Result<Graph, super::MigrateError> {
        let list = super::revision::load_dir(dir).map_err(super::MigrateError::Revisions)?;
        Ok(Graph::build(list)?)
    }

    fn parents_and_deps(&self, id: &str) -> impl Iterator<Item = &String> {
        self.revisions[id]
            .down_revisions
            .iter()
            .chain(self.deps.get(id).into_iter().flatten())
    }

    fn check_cycles(&self) -> Result<(), GraphError> {
        // Iterative DFS with colours over parent+dependency edges.
        #[derive(Clone, Copy, PartialEq)]
        enum Colour {
            White,
            Grey,
            Black,
        }
        let mut colour: HashMap<&str, Colour> = self
            .revisions
            .keys()
            .map(|k| (k.as_str(), Colour::White))
            .collect();
        for root in self.revisions.keys() {
            if colour[root.as_str()] != Colour::White {
                continue;
            }
            let mut stack: Vec<(&str, Vec<&String>)> =
                vec![(root.as_str(), self.parents_and_deps(root).collect())];
            colour.insert(root.as_str(), Colour::Grey);
            while let Some((node, pending)) = stack.last_mut() {
                let node = *node;
                if let Some(next) = pending.pop() {
                    match colour[next.as_str()] {
                        Colour::White => {
                            colour.insert(next.as_str(), Colour::Grey);
                            let edges = self.parents_and_deps(next).collect();
                            stack.push((next.as_str(), edges));
                        }
                        Colour::Grey => {
                            let at = stack
                                .iter()
                                .position(|(n, _)| *n == next.as_str())
                                .unwrap_or(0);
                            let mut files: Vec<String> = stack[at..]
                                .iter()
                                .map(|(n, _)| file_of(&self.revisions[*n]))
                                .collect();
                            files.push(file_of(&self.revisions[next.as_str()]));
                            return Err(GraphError::Cycle { files });
                        }
                        Colour::Black => {}
                    }
                } else {
                    colour.insert(node, Colour::Black);
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    /// Post-order DFS from the heads (sorted), parents and dependencies
    /// first, so a branch's revisions stay together in the order.
    fn topological(&self) -> Vec<String> {
        let mut done: HashSet<String> = HashSet::new();
        let mut order = Vec::new();
        let mut roots: Vec<&String> = self.revisions.keys().collect();
        roots.sort();
        for root in roots {
            let mut stack: Vec<(String, bool)> = vec![(root.clone(), false)];
            while let Some((node, expanded)) = stack.pop() {
                if done.contains(&node) {
                    continue;
                }
                if expanded {
                    done.insert(node.clone());
                    order.push(node);
                    continue;
                }
                stack.push((node.clone(), true));
                let mut edges: Vec<&String> = self.parents_and_deps(&node).collect();
                edges.reverse();
                for e in edges {
                    if !done.contains(e) {
                        stack.push((e.clone(), false));
                    }
                }
            }
        }
        order
    }

    fn propagate_labels(&self) -> HashMap<String, BTreeSet<String>> {
        let mut carried: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (label, declarer) in &self.labels {
            // Descendants through down_revision.
            for id in self.descendants(std::slice::from_ref(declarer), false) {
                carried.entry(id).or_default().insert(label.clone());
            }
            // Ancestors up to (not including) a branch point or merge point.
            let mut node = self.revisions[declarer].down_revisions.clone();
            while node.len() == 1 {
                let parent = node[0].clone();
                let is_branch_point = self.children.get(&parent).map_or(0, |c| c.len()) > 1;
                if is_branch_point {
                    break;
                }
                carried
                    .entry(parent.clone())
                    .or_default()
                    .insert(label.clone());
                node = self.revisions[&parent].down_revisions.clone();
            }
        }
        carried
    }

    pub fn get(&self, id: &str) -> Option<&Revision> {
        self.revisions.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.revisions.is_empty()
    }

    /// Every revision, parents before children.
    pub fn ordered(&self) -> impl Iterator<Item = &Revision> {
        self.order.iter().map(|id| &self.revisions[id])
    }

    pub fn heads(&self) -> &[String] {
        &self.heads
    }

    pub fn bases(&self) -> &[String] {
        &self.bases
    }

    pub fn children(&self, id: &str) -> &[String] {
        self.children.get(id).map_or(&[], |c| c.as_slice())
    }

    pub fn dependencies(&self, id: &str) -> &[String] {
        self.deps.get(id).map_or(&[], |c| c.as_slice())
    }

    /// Labels a revision carries (declared or inherited).
    pub fn labels_of(&self, id: &str) -> Vec<String> {
        self.carried
            .get(id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn is_branch_point(&self, id: &str) -> bool {
        self.children(id).len() > 1
    }

    pub fn is_merge_point(&self, id: &str) -> bool {
        self.revisions
            .get(id)
            .is_some_and(|r| r.down_revisions.len() > 1)
    }

    /// `ids` and all their ancestors; with `deps`, through dependencies too.
    pub fn ancestors(&self, ids: &[String], deps: bool) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut stack: Vec<String> = ids.to_vec();
        while let Some(id) = stack.pop() {
            if !self.revisions.contains_key(&id) || !seen.insert(id.clone()) {
                continue;
            }
            stack.extend(self.revisions[&id].down_revisions.iter().cloned());
            if deps {
                stack.extend(self.dependencies(&id).iter().cloned());
            }
        }
        seen
    }

    /// `ids` and all their descendants; with `deps`, through dependents too.
    pub fn descendants(&self, ids: &[String], deps: bool) -> HashSet<String> {
        let mut seen = HashSet::new();
        let mut stack: Vec<String> = ids.to_vec();
        while let Some(id) = stack.pop() {
            if !self.revisions.contains_key(&id) || !seen.insert(id.clone()) {
                continue;
            }
            stack.extend(self.children(&id).iter().cloned());
            if deps {
                stack.extend(self.dependents.get(&id).into_iter().flatten().cloned());
            }
        }
        seen
    }

    /// The version-table rows for a set of applied revisions: those that are
    /// not a `down_revision` ancestor of another applied one (Alembic keeps a
    /// dependency's row even when a dependent is applied).
    pub fn heads_of(&self, applied: &HashSet<String>) -> Vec<String> {
        let mut heads: Vec<String> = applied
            .iter()
            .filter(|id| !self.children(id).iter().any(|c| applied.contains(c)))
            .cloned()
            .collect();
        heads.sort();
        heads
    }

    /// Applied revisions implied by version-table rows.
    pub fn applied(&self, rows: &[String]) -> Result<HashSet<String>, GraphError> {
        for row in rows {
            if !self.revisions.contains_key(row) {
                return Err(GraphError::UnknownApplied(row.clone()));
            }
        }
        Ok(self.ancestors(rows, false))
    }

    /// Revision ids that start with `prefix` (a label or full id wins).
    fn lookup(&self, spec: &str) -> Result<String, GraphError> {
        if self.revisions.contains_key(spec) {
            return Ok(spec.to_owned());
        }
        if let Some(id) = self.labels.get(spec) {
            return Ok(id.clone());
        }
        let matches: Vec<String> = self
            .revisions
            .keys()
            .filter(|id| !spec.is_empty() && id.starts_with(spec))
            .cloned()
            .collect();
        match matches.len() {
            0 => Err(GraphError::NoSuchRevision(spec.to_owned())),
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            _ => Err(GraphError::AmbiguousPrefix {
                prefix: spec.to_owned(),
                candidates: matches,
            }),
        }
    }

    fn heads_with_label(&self, label: &str) -> Result<Vec<String>, GraphError> {
        if !self.labels.contains_key(label) {
            return Err(GraphError::NoSuchRevision(label.to_owned()));
        }
        Ok(self
            .heads
            .iter()
            .filter(|h| self.carried.get(*h).is_some_and(|l| l.contains(label)))
            .cloned()
            .collect())
    }

    /// Resolves a target identifier: `head`, `heads`, `base`, `current`,
    /// `label@head`, `label@heads`, `label@base`, `label@<rev>`, a revision
    /// id, unique prefix or branch label, and the relative forms `+N`, `-N`
    /// (from `current`), `<rev>+N`, `<rev>-N`, `label@+N`, `label@-N`.
    /// `current` is the shard's version-table rows.
    pub fn resolve(&self, spec: &str, current: &[String]) -> Result<Target, GraphError> {
        let spec = spec.trim();
        match spec {
            "heads" => return Ok(Target::Revisions(self.heads.clone())),
            "head" => {
                return match self.heads.len() {
                    0 => Ok(Target::Base),
                    1 => Ok(Target::Revisions(self.heads.clone())),
                    _ => Err(GraphError::MultipleHeads {
                        argument: spec.into(),
                    }),
                }
            }
            "base" => return Ok(Target::Base),
            "current" => {
                return Ok(if current.is_empty() {
                    Target::Base
                } else {
                    let mut c = current.to_vec();
                    c.sort();
                    Target::Revisions(c)
                })
            }
            _ => {}
        }
        if let Some((label, rest)) = spec.split_once('@') {
            if !self.labels.contains_key(label) {
                return Err(GraphError::NoSuchRevision(label.to_owned()));
            }
            return match rest {
                "head" => {
                    let heads = self.heads_with_label(label)?;
                    if heads.len() > 1 {
                        Err(GraphError::MultipleHeads {
                            argument: spec.into(),
                        })
                    } else {
                        Ok(Target::Revisions(heads))
                    }
                }
                "heads" => Ok(Target::Revisions(self.heads_with_label(label)?)),
                "base" => Ok(Target::BranchBase(label.to_owned())),
                _ if rest.starts_with('+') || rest.starts_with('-') => {
                    let (forward, n) = parse_steps(rest, spec)?;
                    let in_branch: Vec<String> = current
                        .iter()
                        .filter(|c| self.carried.get(*c).is_some_and(|l| l.contains(label)))
                        .cloned()
                        .collect();
                    let from = match in_branch.len() {
                        0 => None,
                        1 => Some(in_branch[0].clone()),
                        _ => {
                            return Err(GraphError::MultipleHeads {
                                argument: spec.into(),
                            })
                        }
                    };
                    let from = match from {
                        Some(f) => Some(f),
                        None if forward => {
                            // From the base of the branch: its root revision.
                            let mut root = self.labels[label].clone();
                            while let [parent] = self.revisions[&root].down_revisions.as_slice() {
                                if !self.carried.get(parent).is_some_and(|l| l.contains(label)) {
                                    break;
                                }
                                root = parent.clone();
                            }
                            return self.walk(&root, true, n - 1, spec, n);
                        }
                        None => None,
                    };
                    match from {
                        Some(f) => self.walk(&f, forward, n, spec, n),
                        None => Err(GraphError::RelativeOutOfRange {
                            spec: spec.into(),
                            steps: n,
                        }),
                    }
                }
                _ => {
                    let id = match self.resolve(rest, current)? {
                        Target::Revisions(ids) if ids.len() == 1 => ids[0].clone(),
                        _ => return Err(GraphError::NoSuchRevision(spec.to_owned())),
                    };
                    if !self.carried.get(&id).is_some_and(|l| l.contains(label)) {
                        return Err(GraphError::NotInBranch {
                            revision: id,
                            label: label.to_owned(),
                        });
                    }
                    Ok(Target::Revisions(vec![id]))
                }
            };
        }
        // Relative forms.
        if let Some(pos) = spec.rfind(['+', '-']) {
            let (base, steps) = spec.split_at(pos);
            if steps.len() > 1 && steps[1..].bytes().all(|b| b.is_ascii_digit()) {
                let (forward, n) = parse_steps(steps, spec)?;
                let from: Option<String> = if base.is_empty() {
                    match current.len() {
                        0 => None,
                        1 => Some(current[0].clone()),
                        _ => {
                            return Err(GraphError::MultipleHeads {
                                argument: spec.into(),
                            })
                        }
                    }
                } else {
                    match self.resolve(base, current)? {
                        Target::Revisions(ids) if ids.len() == 1 => Some(ids[0].clone()),
                        Target::Revisions(ids) if ids.len() > 1 => {
                            return Err(GraphError::MultipleHeads {
                                argument: spec.into(),
                            })
                        }
                        _ => None,
                    }
                };
                return match from {
                    Some(from) => self.walk(&from, forward, n, spec, n),
                    None if forward => match self.bases.as_slice() {
                        [only] => self.walk(only, true, n - 1, spec, n),
                        [] => Err(GraphError::RelativeOutOfRange {
                            spec: spec.into(),
                            steps: n,
                        }),
                        several => Err(GraphError::RelativeAmbiguous {
                            spec: spec.into(),
                            revision: "base".into(),
                            direction: "roots",
                            options: several.to_vec(),
                        }),
                    },
                    None => Err(GraphError::RelativeOutOfRange {
                        spec: spec.into(),
                        steps: n,
                    }),
                };
            }
        }
        Ok(Target::Revisions(vec![self.lookup(spec)?]))
    }

    /// Walks `n` single steps from `from`; refuses to guess at a branch or
    /// merge point. Walking down exactly past a base gives `Base`.
    fn walk(
        &self,
        from: &str,
        forward: bool,
        n: usize,
        spec: &str,
        total: usize,
    ) -> Result<Target, GraphError> {
        let mut at = from.to_owned();
        for _ in 0..n {
            let next: Vec<String> = if forward {
                self.children(&at).to_vec()
            } else {
                self.revisions[&at].down_revisions.clone()
            };
            match next.len() {
                0 if !forward => {
                    // Fell off the base: fine only if this was the last step.
                    return Err(GraphError::RelativeOutOfRange {
                        spec: spec.into(),
                        steps: total,
                    });
                }
                0 => {
                    return Err(GraphError::RelativeOutOfRange {
                        spec: spec.into(),
                        steps: total,
                    })
                }
                1 => at = next[0].clone(),
                _ => {
                    return Err(GraphError::RelativeAmbiguous {
                        spec: spec.into(),
                        revision: at,
                        direction: if forward { "children" } else { "parents" },
                        options: next,
                    })
                }
            }
        }
        Ok(Target::Revisions(vec![at]))
    }

    /// Upgrade steps from `current` rows to `targets`, parents and
    /// dependencies first.
    pub fn upgrade_steps(
        &self,
        current: &[String],
        target: &Target,
    ) -> Result<Vec<String>, GraphError> {
        let targets = match target {
            Target::Revisions(ids) => ids.clone(),
            Target::Base => return Ok(Vec::new()),
            Target::BranchBase(_) => return Ok(Vec::new()),
        };
        let applied = self.applied(current)?;
        let needed = self.ancestors(&targets, true);
        Ok(self
            .order
            .iter()
            .filter(|id| needed.contains(*id) && !applied.contains(*id))
            .cloned()
            .collect())
    }

    /// Downgrade steps from `current` rows to `target`, dependents and
    /// children first. Only what descends from the target is removed; other
    /// branches stay (Alembic's rule).
    pub fn downgrade_steps(
        &self,
        current: &[String],
        target: &Target,
        spec: &str,
    ) -> Result<Vec<String>, GraphError> {
        let applied = self.applied(current)?;
        let remove: HashSet<String> = match target {
            Target::Base => applied.clone(),
            Target::BranchBase(label) => {
                let in_branch: Vec<String> = applied
                    .iter()
                    .filter(|id| self.carried.get(*id).is_some_and(|l| l.contains(label)))
                    .cloned()
                    .collect();
                self.descendants(&in_branch, true)
                    .into_iter()
                    .filter(|id| applied.contains(id))
                    .collect()
            }
            Target::Revisions(ids) => {
                for id in ids {
                    if !applied.contains(id) {
                        return Err(GraphError::NotADowngradeTarget {
                            target: spec.to_owned(),
                        });
                    }
                }
                // What descends from the target through down_revision goes,
                // and with it whatever depends on something that goes.
                let keep = self.ancestors(ids, true);
                let seeds: Vec<String> = self
                    .descendants(ids, false)
                    .into_iter()
                    .filter(|id| !keep.contains(id))
                    .collect();
                self.descendants(&seeds, true)
                    .into_iter()
                    .filter(|id| applied.contains(id) && !keep.contains(id))
                    .collect()
            }
        };
        Ok(self
            .order
            .iter()
            .rev()
            .filter(|id| remove.contains(*id))
            .cloned()
            .collect())
    }

    /// Alembic-style one-line description: `parents -> rev (label) (head)…, message`.
    pub fn describe(&self, id: &str) -> String {
        let r = &self.revisions[id];
        let parents = match r.down_revisions.as_slice() {
            [] => "<base>".to_owned(),
            [one] => one.clone(),
            many => format!("({})", many.join(", ")),
        };
        format!("{parents} -> {}, {}", self.tagged(id), r.message)
    }

    /// `rev (labels) (head) (branchpoint) (mergepoint)`.
    pub fn tagged(&self, id: &str) -> String {
        let r = &self.revisions[id];
        let mut out = id.to_owned();
        if !r.branch_labels.is_empty() {
            out.push_str(&format!(" ({})", r.branch_labels.join(", ")));
        }
        if self.heads.iter().any(|h| h == id) {
            out.push_str(" (head)");
        }
        if self.is_branch_point(id) {
            out.push_str(" (branchpoint)");
        }
        if self.is_merge_point(id) {
            out.push_str(" (mergepoint)");
        }
        if !self.dependencies(id).is_empty() {
            out.push_str(&format!(
                " (depends on {})",
                self.dependencies(id).join(", ")
            ));
        }
        out
    }

    /// Revisions in `lower:upper` (either side optional, Alembic's `-r`),
    /// newest first. The lower end is included.
    pub fn history(
        &self,
        range: Option<&str>,
        current: &[String],
    ) -> Result<Vec<String>, GraphError> {
        let (lower, upper) = match range {
            None => ("", ""),
            Some(r) => match r.split_once(':') {
                Some((l, u)) => (l, u),
                None => (r, r),
            },
        };
        let upper_ids = if upper.is_empty() || upper == "heads" {
            self.heads.clone()
        } else {
            match self.resolve(upper, current)? {
                Target::Revisions(ids) => ids,
                _ => Vec::new(),
            }
        };
        let mut set = self.ancestors(&upper_ids, true);
        if !lower.is_empty() && lower != "base" {
            if let Target::Revisions(ids) = self.resolve(lower, current)? {
                let below: HashSet<String> = self
                    .ancestors(&ids, true)
                    .into_iter()
                    .filter(|a| !ids.contains(a))
                    .collect();
                set.retain(|id| !below.contains(id));
            }
        }
        Ok(self
            .order
            .iter()
            .rev()
            .filter(|id| set.contains(*id))
            .cloned()
            .collect())
    }
}

fn parse_steps(text: &str, spec: &str) -> Result<(bool, usize), GraphError> {
    let forward = text.starts_with('+');
    let n: usize = text[1..]
        .parse()
        .map_err(|_| GraphError::NoSuchRevision(spec.to_owned()))?;
    if n == 0 {
        return Err(GraphError::NoSuchRevision(spec.to_owned()));
    }
    Ok((forward, n))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Base => f.write_str("base"),
            Target::BranchBase(label) => write!(f, "{label}@base"),
            Target::Revisions(ids) if ids.is_empty() => f.write_str("base"),
            Target::Revisions(ids) => f.write_str(&ids.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::revision::Kind;
    use std::path::PathBuf;

    fn rev(id: &str, parents: &[&str], labels: &[&str], deps: &[&str]) -> Revision {
        Revision {
            id: id.into(),
            slug: format!("r{id}"),
            message: format!("msg {id}"),
            dir: PathBuf::from(format!("m/{id}_r")),
            up_path: PathBuf::from(format!("m/{id}_r/up.sql")),
            down_path: None,
            down_revisions: parents.iter().map(|s| s.to_string()).collect(),
            branch_labels: labels.iter().map(|s| s.to_string()).collect(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            transactional: true,
            kind: Kind::Schema,
            irreversible: false,
            batch: None,
            scope: Default::default(),
            up_sql: String::new(),
            down_sql: None,
            checksum: String::new(),
        }
    }

    // a1 -> b1 (label x) -> c1 ----\
    //   \-> b2 (label y) -> c2 -----> m1 (merge) ; d1 base branch (label z) depends on b1
    const A: &str = "a00000000001";
    const B1: &str = "b10000000001";
    const C1: &str = "c10000000001";
    const B2: &str = "b20000000002";
    const C2: &str = "c20000000002";
    const M: &str = "e00000000001";
    const D: &str = "d00000000001";
    const D2: &str = "d00000000002";

    fn sample() -> Graph {
        Graph::build(vec![
            rev(A, &[], &[], &[]),
            rev(B1, &[A], &["x"], &[]),
            rev(C1, &[B1], &[], &[]),
            rev(B2, &[A], &["y"], &[]),
            rev(C2, &[B2], &[], &[]),
            rev(M, &[C1, C2], &[], &[]),
            rev(D, &[], &["z"], &[B1]),
            rev(D2, &[D], &[], &[]),
        ])
        .unwrap()
    }

    fn ids(t: Target) -> Vec<String> {
        match t {
            Target::Revisions(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heads_bases_points() {
        let g = sample();
        assert_eq!(g.heads(), &[D2.to_string(), M.to_string()]);
        assert_eq!(g.bases(), &[A.to_string(), D.to_string()]);
        assert!(g.is_branch_point(A));
        assert!(g.is_merge_point(M));
        let order: Vec<&str> = g.ordered().map(|r| r.id.as_str()).collect();
        let pos = |x: &str| order.iter().position(|o| *o == x).unwrap();
        assert!(pos(A) < pos(B1) && pos(B1) < pos(D) && pos(C1) < pos(M) && pos(C2) < pos(M));
    }

    #[test]
    fn labels_propagate_like_alembic() {
        let g = sample();
        assert!(g.labels_of(C1).contains(&"x".to_string()));
        assert!(g.labels_of(M).contains(&"x".to_string()));
        assert!(g.labels_of(M).contains(&"y".to_string()));
        assert!(
            !g.labels_of(A).contains(&"x".to_string()),
            "a branch point is not inherited"
        );
        assert_eq!(ids(g.resolve("z@head", &[]).unwrap()), vec![D2]);
        assert_eq!(ids(g.resolve("x@head", &[]).unwrap()), vec![M]);
        assert_eq!(ids(g.resolve("x", &[]).unwrap()), vec![B1]);
        assert_eq!(ids(g.resolve("x@c1", &[]).unwrap()), vec![C1]);
        assert!(matches!(
            g.resolve("x@c2", &[]),
            Err(GraphError::NotInBranch { .. })
        ));
        assert_eq!(
            g.resolve("z@base", &[]).unwrap(),
            Target::BranchBase("z".into())
        );
    }

    #[test]
    fn head_is_ambiguous_with_two_heads() {
        let g = sample();
        let e = g.resolve("head", &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Multiple head revisions are present for given argument 'head'"),
            "{e}"
        );
        assert_eq!(ids(g.resolve("heads", &[]).unwrap()).len(), 2);
        assert_eq!(g.resolve("base", &[]).unwrap(), Target::Base);
        assert_eq!(ids(g.resolve("current", &[C1.into()]).unwrap()), vec![C1]);
        assert_eq!(g.resolve("current", &[]).unwrap(), Target::Base);
    }

    #[test]
    fn prefixes() {
        let g = sample();
        assert_eq!(ids(g.resolve("e0", &[]).unwrap()), vec![M]);
        let e = g.resolve("d0", &[]).unwrap_err();
        assert!(matches!(e, GraphError::AmbiguousPrefix { .. }), "{e}");
        assert!(e.to_string().contains(D) && e.to_string().contains(D2));
        assert_eq!(
            g.resolve("ff", &[]).unwrap_err().to_string(),
            "No such revision or branch 'ff'"
        );
    }

    #[test]
    fn relative() {
        let g = sample();
        assert_eq!(ids(g.resolve("b1+1", &[]).unwrap()), vec![C1]);
        assert_eq!(ids(g.resolve("c1-2", &[]).unwrap()), vec![A]);
        assert_eq!(ids(g.resolve("-1", &[C1.into()]).unwrap()), vec![B1]);
        assert_eq!(ids(g.resolve("+1", &[B1.into()]).unwrap()), vec![C1]);
        assert!(matches!(
            g.resolve("a0+1", &[]),
            Err(GraphError::RelativeAmbiguous { .. })
        ));
        assert!(matches!(
            g.resolve("e0-1", &[]),
            Err(GraphError::RelativeAmbiguous { .. })
        ));
        let e = g.resolve("c1-3", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Relative revision c1-3 didn't produce 3 migrations"
        );
        assert!(matches!(
            g.resolve("-1", &[C1.into(), D.into()]),
            Err(GraphError::MultipleHeads { .. })
        ));
        assert_eq!(ids(g.resolve("z@+1", &[]).unwrap()), vec![D]);
        assert_eq!(ids(g.resolve("z@+1", &[D.into()]).unwrap()), vec![D2]);
        assert_eq!(
            ids(g.resolve("z@-1", &[D2.into(), C1.into()]).unwrap()),
            vec![D]
        );
        assert!(matches!(
            g.resolve("head-1", &[]),
            Err(GraphError::MultipleHeads { .. })
        ));
    }

    #[test]
    fn upgrade_includes_dependencies_and_orders_them() {
        let g = sample();
        let steps = g
            .upgrade_steps(&[], &g.resolve("z@head", &[]).unwrap())
            .unwrap();
        assert_eq!(steps, vec![A, B1, D, D2]);
        let steps = g
            .upgrade_steps(&[D2.into(), B1.into()], &g.resolve("heads", &[]).unwrap())
            .unwrap();
        assert_eq!(steps.len(), 4); // c1, b2, c2, m
        assert_eq!(steps.last().unwrap(), M);
        assert!(g
            .upgrade_steps(&[M.into(), D2.into()], &Target::Base)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn version_rows_follow_alembic() {
        let g = sample();
        let mut applied = HashSet::new();
        for id in g
            .upgrade_steps(&[], &Target::Revisions(g.heads().to_vec()))
            .unwrap()
        {
            applied.insert(id);
        }
        assert_eq!(g.heads_of(&applied), vec![D2.to_string(), M.to_string()]);
        applied.remove(M);
        assert_eq!(
            g.heads_of(&applied),
            vec![C1.to_string(), C2.to_string(), D2.to_string()]
        );
        // A dependency keeps its own row.
        let only: HashSet<String> = [A, B1, D].iter().map(|s| s.to_string()).collect();
        assert_eq!(g.heads_of(&only), vec![B1.to_string(), D.to_string()]);
    }

    #[test]
    fn downgrade_removes_descendants_and_dependents_only() {
        let g = sample();
        let all = vec![M.to_string(), D2.to_string()];
        // Down to b1: c1, the merge and c2? No: c2 is not a descendant of b1.
        let steps = g
            .downgrade_steps(&all, &g.resolve("b1", &all).unwrap(), "b1")
            .unwrap();
        assert_eq!(steps, vec![M, C1]);
        // Down to a: everything below a goes, including d (depends on b1).
        let steps = g
            .downgrade_steps(&all, &g.resolve("a0", &all).unwrap(), "a0")
            .unwrap();
        assert!(steps.contains(&D.to_string()) && steps.contains(&D2.to_string()));
        let pos = |x: &str| steps.iter().position(|o| o == x).unwrap();
        assert!(pos(D2) < pos(D) && pos(D) < pos(B1) && pos(M) < pos(C1));
        assert!(!steps.contains(&A.to_string()));
        // Branch base removes just that branch.
        let steps = g
            .downgrade_steps(&all, &Target::BranchBase("z".into()), "z@base")
            .unwrap();
        assert_eq!(steps, vec![D2, D]);
        assert_eq!(
            g.downgrade_steps(&all, &Target::Base, "base")
                .unwrap()
                .len(),
            8
        );
        let e = g
            .downgrade_steps(&[B1.into()], &g.resolve("c1", &[]).unwrap(), "c1")
            .unwrap_err();
        assert!(matches!(e, GraphError::NotADowngradeTarget { .. }));
    }

    #[test]
    fn build_errors_name_files() {
        let e = Graph::build(vec![rev(A, &[], &[], &[]), rev(A, &[], &[], &[])]).unwrap_err();
        assert!(matches!(e, GraphError::Duplicate { .. }));
        let e = Graph::build(vec![rev(B1, &[A], &[], &[])]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("m/{B1}_r/up.sql: down_revision {A} does not exist")
        );
        let e = Graph::build(vec![rev(B1, &[], &[], &["nolabel"])]).unwrap_err();
        assert!(e.to_string().contains("depends_on `nolabel`"), "{e}");
        let e = Graph::build(vec![
            rev(A, &[C1], &[], &[]),
            rev(B1, &[A], &[], &[]),
            rev(C1, &[B1], &[], &[]),
        ])
        .unwrap_err();
        assert!(matches!(e, GraphError::Cycle { .. }));
        assert!(e.to_string().contains("up.sql ->"), "{e}");
        let e =
            Graph::build(vec![rev(A, &[], &["x"], &[]), rev(B1, &[], &["x"], &[])]).unwrap_err();
        assert!(matches!(e, GraphError::DuplicateLabel { .. }));
        let e = Graph::build(vec![rev(A, &[], &[], &[B1]), rev(B1, &[A], &[], &[])]).unwrap_err();
        assert!(
            matches!(e, GraphError::Cycle { .. }),
            "a dependency cycle too"
        );
    }

    #[test]
    fn history_ranges_and_describe() {
        let g = sample();
        let all = g.history(None, &[]).unwrap();
        assert_eq!(all.len(), 8);
        let part = g.history(Some("b1:e0"), &[]).unwrap();
        assert!(part.contains(&B1.to_string()) && part.contains(&M.to_string()));
        assert!(!part.contains(&A.to_string()));
        assert!(part.contains(&C2.to_string()));
        assert_eq!(
            g.describe(M),
            format!("({C1}, {C2}) -> {M} (head) (mergepoint), msg {M}")
        );
        assert_eq!(
            g.describe(A),
            format!("<base> -> {A} (branchpoint), msg {A}")
        );
        assert!(g.describe(D).contains("(z)") && g.describe(D).contains("depends on"));
    }
}
