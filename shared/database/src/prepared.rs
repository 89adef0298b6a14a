//! Raw SQL whose prepared statement is kept per connection.
//!
//! diesel's [`diesel::sql_query`] marks every statement unsafe to cache, so
//! diesel-async parses and plans it again on every call: one more round trip
//! (Parse/Describe before Bind/Execute) and the server's parse work, each
//! time. On the hot paths (the consumer's positions, the relay's marking)
//! that was a third of the statements' server time. A statement whose text
//! never changes (every value a bind, no list of values spelled out) is as
//! safe to cache as a typed diesel query: [`prepared`] says so, and the
//! connection's statement cache keys it by its text and bind types.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A raw statement, cached once prepared; see the module docs.
#[derive(Debug, Clone)]
pub struct Prepared<Q>(Q);

/// Marks `query` (a [`diesel::sql_query`] with its binds) as one whose text
/// is the same on every call, so its prepared statement is cached. Never use
/// it on SQL built from values (a `format!` of ids, a list of `VALUES`):
/// each text would take a slot in the cache for good.
pub fn prepared<Q>(query: Q) -> Prepared<Q> {
    Prepared(query)
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
