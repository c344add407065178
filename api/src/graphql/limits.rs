//! [`QueryLimits`]: the depth and complexity limits, as a schema extension.
//!
//! - **Depth**: fields nested at most [`MAX_DEPTH`] deep. `ofType` does not count: it
//!   unwraps one list or non-null wrapper of a type — one object, never a fan-out — and
//!   the standard introspection query GraphiQL sends nests it nine times, which a plain
//!   limit of 10 would refuse. Every other field counts, introspection ones included
//!   (`fields { type { fields { ... } } }` fans out and does count).
//! - **Complexity**: at most [`MAX_COMPLEXITY`], where every selected field costs 1 plus
//!   its sub-selection, aliases each on their own, except the fields that scan the read
//!   model: the lists `successRates`, `courierEfficiency`, `peakTimes`, `satisfaction`
//!   and the subscription `metricChanged` cost [`SCAN_COST`] plus their sub-selection, and
//!   `deliveries` costs its sub-selection `first` times but never less than [`SCAN_COST`]
//!   (`deliveries(first: 0)` walks the deliveries just the same). So a query holds at most
//!   ten scans: `deliveries(first: 0) { hasNextPage }` under 240 aliases is refused.
//!   The cost is checked twice: a cheap count of fields with fragments expanded once
//!   (memoized) before validation — so a document whose fragments would expand
//!   exponentially is refused before anything walks it in full — and the schema's own
//!   weighted cost after validation.
//!
//! - **Nesting**: selection sets (fields with sub-selections, fragment spreads, inline
//!   fragments) nest at most [`MAX_NESTING`] levels, async-graphql's own default bound on
//!   recursion.
//!
//! The extension parses the document itself instead of letting the schema do it: the
//! schema's parse step checks nesting by walking every fragment spread anew, which takes
//! time exponential in the number of fragments that spread each other twice (a 2 KiB
//! document can keep a core busy for minutes). Here each fragment is measured once.
//!
//! A refused query is answered with one error whose `extensions.code` is
//! `QUERY_TOO_DEEP` or `QUERY_TOO_COMPLEX`, and nothing is executed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation,
};
use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, Selection, SelectionSet,
};
use async_graphql::{
    Name, Pos, Positioned, ServerError, ServerResult, ValidationResult, Variables,
};

use super::access::{QUERY_TOO_COMPLEX, QUERY_TOO_DEEP, error};

/// The deepest nesting of fields accepted (`ofType` aside).
pub const MAX_DEPTH: usize = 10;
/// The highest cost accepted.
pub const MAX_COMPLEXITY: usize = 500;
/// The least a field that scans the read model costs, whatever its arguments.
pub const SCAN_COST: usize = 50;
/// Selection sets nested in selection sets, at most (fields with sub-selections, spreads
/// and inline fragments each open one); this also bounds the walk's recursion.
pub const MAX_NESTING: usize = 32;

/// The extension factory: add it to the schema with `.extension(QueryLimits::default())`.
#[derive(Clone, Copy, Debug)]
pub struct QueryLimits {
    /// See [`MAX_DEPTH`].
    pub max_depth: usize,
    /// See [`MAX_COMPLEXITY`].
    pub max_complexity: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_depth: MAX_DEPTH,
            max_complexity: MAX_COMPLEXITY,
        }
    }
}

impl ExtensionFactory for QueryLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(*self)
    }
}

#[async_graphql::async_trait::async_trait]
impl Extension for QueryLimits {
    /// Parses and measures the document; `next` (the schema's own parse, with its
    /// exponential nesting check) is deliberately not run.
    async fn parse_query(
        &self,
        _ctx: &ExtensionContext<'_>,
        query: &str,
        _variables: &Variables,
        _next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = async_graphql::parser::parse_query(query)?;
        let cost = measure(&document)?;
        if cost.depth > self.max_depth {
            return Err(refusal(
                QUERY_TOO_DEEP,
                format!(
                    "the query nests fields {} deep; at most {} is allowed",
                    cost.depth, self.max_depth
                ),
            ));
        }
        if cost.size > self.max_complexity {
            return Err(too_complex(cost.size, self.max_complexity));
        }
        Ok(document)
    }

    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        let result = next.run(ctx).await?;
        if result.complexity > self.max_complexity {
            return Err(vec![too_complex(result.complexity, self.max_complexity)]);
        }
        Ok(result)
    }
}

fn too_complex(cost: usize, max: usize) -> ServerError {
    refusal(
        QUERY_TOO_COMPLEX,
        format!("the query costs {cost}; at most {max} is allowed"),
    )
}

fn refusal(code: &'static str, message: String) -> ServerError {
    error(code, message).into_server_error(Pos::default())
}

/// How deep and how large a selection is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Deepest nesting of fields, `ofType` not counted.
    pub depth: usize,
    /// Fields selected, fragments expanded.
    pub size: usize,
    /// Deepest nesting of selection sets below this one (see [`MAX_NESTING`]).
    pub nesting: usize,
}

/// The cost of the costliest operation of `document`, in time linear in its size.
///
/// # Errors
/// `QUERY_TOO_DEEP` when selection sets nest more than [`MAX_NESTING`] levels.
pub fn measure(document: &ExecutableDocument) -> ServerResult<Cost> {
    let mut walk = Walk {
        fragments: &document.fragments,
        memo: HashMap::new(),
        active: HashSet::new(),
    };
    let mut worst = Cost::default();
    for (_, operation) in document.operations.iter() {
        let cost = walk.set(&operation.node.selection_set.node, 0)?;
        worst.depth = worst.depth.max(cost.depth);
        worst.size = worst.size.max(cost.size);
        worst.nesting = worst.nesting.max(cost.nesting);
    }
    if worst.nesting > MAX_NESTING {
        return Err(too_nested());
    }
    Ok(worst)
}

fn too_nested() -> ServerError {
    refusal(
        QUERY_TOO_DEEP,
        format!("selections nest more than {MAX_NESTING} levels deep"),
    )
}

/// One walk over a document: each fragment is measured once (its cost does not depend on
/// where it is spread) and reused.
struct Walk<'a> {
    fragments: &'a HashMap<Name, Positioned<FragmentDefinition>>,
    memo: HashMap<&'a str, Cost>,
    /// Fragments being measured: a spread of one of them is a cycle, which validation
    /// refuses afterwards; here it costs nothing.
    active: HashSet<&'a str>,
}

impl<'a> Walk<'a> {
    /// The cost of `set`, found `path` levels below the operation.
    fn set(&mut self, set: &'a SelectionSet, path: usize) -> ServerResult<Cost> {
        if path > MAX_NESTING {
            return Err(too_nested());
        }
        let mut cost = Cost::default();
        for selection in &set.items {
            let inner = match &selection.node {
                Selection::Field(field) => {
                    let field = &field.node;
                    let children = &field.selection_set.node;
                    let below = if children.items.is_empty() {
                        Cost::default()
                    } else {
                        let below = self.set(children, path + 1)?;
                        Cost {
                            nesting: below.nesting + 1,
                            ..below
                        }
                    };
                    let own_level = usize::from(field.name.node.as_str() != "ofType");
                    Cost {
                        depth: below.depth.saturating_add(own_level),
                        size: below.size.saturating_add(1),
                        nesting: below.nesting,
                    }
                }
                Selection::InlineFragment(fragment) => {
                    let below = self.set(&fragment.node.selection_set.node, path + 1)?;
                    Cost {
                        nesting: below.nesting + 1,
                        ..below
                    }
                }
                Selection::FragmentSpread(spread) => {
                    let below = self.fragment(spread.node.fragment_name.node.as_str(), path + 1)?;
                    Cost {
                        nesting: below.nesting + 1,
                        ..below
                    }
                }
            };
            cost.depth = cost.depth.max(inner.depth);
            cost.size = cost.size.saturating_add(inner.size);
            cost.nesting = cost.nesting.max(inner.nesting);
        }
        Ok(cost)
    }

    /// The cost of a fragment's selection set, measured on its first spread.
    fn fragment(&mut self, name: &'a str, path: usize) -> ServerResult<Cost> {
        if let Some(cost) = self.memo.get(name) {
            return Ok(*cost);
        }
        // An unknown fragment is validation's to report.
        let Some((key, definition)) = self.fragments.get_key_value(name) else {
            return Ok(Cost::default());
        };
        let key = key.as_str();
        if !self.active.insert(key) {
            return Ok(Cost::default());
        }
        let cost = self.set(&definition.node.selection_set.node, path);
        self.active.remove(key);
        let cost = cost?;
        self.memo.insert(key, cost);
        Ok(cost)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use async_graphql::parser::parse_query;

    fn cost(query: &str) -> (usize, usize, usize) {
        let c = measure(&parse_query(query).unwrap()).unwrap();
        (c.depth, c.size, c.nesting)
    }

    #[test]
    fn depth_counts_fields_but_not_of_type() {
        assert_eq!(cost("{ a }"), (1, 1, 0));
        assert_eq!(cost("{ a { b c { d } } e }"), (3, 5, 2));
        assert_eq!(
            cost("{ __type(name: \"X\") { ofType { ofType { ofType { name } } } } }"),
            (2, 5, 4)
        );
        // Fragments and inline fragments add no field level, but do nest.
        assert_eq!(
            cost("query { a { ...F ... on T { z } } } fragment F on T { b { c } }"),
            (3, 4, 3)
        );
    }

    #[test]
    fn nesting_is_bounded_like_the_schema_would() {
        let nested = |levels: usize| {
            let mut query = String::from("x");
            for _ in 0..levels {
                query = format!("ofType {{ {query} }}");
            }
            format!("{{ {query} }}")
        };
        assert_eq!(cost(&nested(32)).2, 32);
        assert!(measure(&parse_query(nested(33)).unwrap()).is_err());
    }

    #[test]
    fn fragments_are_measured_once_even_when_they_expand_exponentially() {
        // F0 spreads F1 twice, F1 spreads F2 twice, ...: 2^20 fields once expanded.
        let mut query = String::from("{ ...F0 }");
        for i in 0..20 {
            query.push_str(&format!(
                " fragment F{i} on Query {{ ...F{} ...F{} }}",
                i + 1,
                i + 1
            ));
        }
        query.push_str(" fragment F20 on Query { x }");
        let started = std::time::Instant::now();
        assert_eq!(cost(&query), (1, 1 << 20, 21));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));

        // 40 levels of them: refused for nesting, as fast.
        let mut query = String::from("{ ...F0 }");
        for i in 0..40 {
            query.push_str(&format!(
                " fragment F{i} on Query {{ ...F{} ...F{} }}",
                i + 1,
                i + 1
            ));
        }
        query.push_str(" fragment F40 on Query { x }");
        let started = std::time::Instant::now();
        assert!(measure(&parse_query(&query).unwrap()).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_fragment_cycle_terminates() {
        let c = cost("{ ...A } fragment A on Query { x ...B } fragment B on Query { y ...A }");
        assert_eq!(c.0, 1);
    }
}
