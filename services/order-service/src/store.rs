//! The order service's storage: every command is one transaction that
//! changes the order rows and writes the event describing the change to the
//! outbox; the projection of users is read to check who may order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable,
    SelectableHelper as _,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use shop_contracts::order as pb;
use shop_host::grpc::StaleVersion;
use uuid::Uuid;

use crate::error::Error;
use crate::schema::{create_order_requests, known_users, order_items, orders};

/// `orders.status` of a placed order.
pub const PENDING: &str = "PENDING";
/// `orders.status` of a cancelled order.
pub const CANCELLED: &str = "CANCELLED";

/// One item of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    /// Product id.
    pub product_id: String,
    /// 1 to 1000.
    pub quantity: i32,
}

/// A validated `CreateOrder`.
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// Who orders.
    pub user_id: Uuid,
    /// Idempotency key, when the client sent one.
    pub request_id: Option<Uuid>,
    /// The items, in the caller's order.
    pub lines: Vec<OrderLine>,
}

impl NewOrder {
    /// What identifies the request's content for idempotency checks: a
    /// canonical encoding (JSON, every string quoted and escaped), so two
    /// different requests never share one, whatever their product ids
    /// contain.
    fn fingerprint(&self) -> String {
        let lines: Vec<(&str, i32)> = self
            .lines
            .iter()
            .map(|line| (line.product_id.as_str(), line.quantity))
            .collect();
        serde_json::json!([self.user_id, lines]).to_string()
    }
}

/// An order row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = orders)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct OrderRow {
    /// See `shop.order.v1.Order`.
    pub id: Uuid,
    /// Who ordered.
    pub user_id: Uuid,
    /// [`PENDING`] or [`CANCELLED`].
    pub status: String,
    /// 1 after creation, +1 per change.
    pub version: i64,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

/// An order with its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The order row.
    pub row: OrderRow,
    /// Its items, in line order.
    pub lines: Vec<OrderLine>,
}

fn items_to_pb(lines: &[OrderLine]) -> Vec<pb::OrderItem> {
    lines
        .iter()
        .map(|line| pb::OrderItem {
            product_id: line.product_id.clone(),
            quantity: line.quantity,
        })
        .collect()
}

fn status_to_pb(status: &str) -> pb::OrderStatus {
    match status {
        PENDING => pb::OrderStatus::Pending,
        CANCELLED => pb::OrderStatus::Cancelled,
        _ => pb::OrderStatus::Unspecified,
    }
}

impl From<Order> for pb::Order {
    fn from(order: Order) -> Self {
        Self {
            id: order.row.id.to_string(),
            user_id: order.row.user_id.to_string(),
            items: items_to_pb(&order.lines),
            status: status_to_pb(&order.row.status) as i32,
            version: order.row.version,
            created_at: Some(timestamp(order.row.created_at)),
            updated_at: Some(timestamp(order.row.updated_at)),
        }
    }
}

/// The protobuf timestamp of a database time.
pub fn timestamp(time: DateTime<Utc>) -> shop_contracts::prost_types::Timestamp {
    shop_contracts::prost_types::Timestamp::from(std::time::SystemTime::from(time))
}

/// Places an order for a user the projection knows and writes
/// `OrderCreated`, or returns the order a previous call with the same
/// request id placed.
#[tracing::instrument(name = "db.create_order", skip_all, fields(db.system = "postgresql", user.id = %new.user_id, order.id))]
pub async fn create_order(conn: &mut AsyncPgConnection, new: &NewOrder) -> Result<Order, Error> {
    conn.transaction(async |conn| {
        let id = Uuid::now_v7();
        if let Some(request_id) = new.request_id {
            let claimed = diesel::insert_into(create_order_requests::table)
                .values((
                    create_order_requests::request_id.eq(request_id),
                    create_order_requests::order_id.eq(id),
                    create_order_requests::fingerprint.eq(new.fingerprint()),
                ))
                .on_conflict_do_nothing()
                .execute(conn)
                .await?;
            if claimed == 0 {
                let (order_id, fingerprint): (Uuid, String) = create_order_requests::table
                    .find(request_id)
                    .select((
                        create_order_requests::order_id,
                        create_order_requests::fingerprint,
                    ))
                    .first(conn)
                    .await?;
                if fingerprint != new.fingerprint() {
                    return Err(Error::RequestIdReused(request_id));
                }
                return find(conn, order_id).await?.ok_or(Error::NotFound(order_id));
            }
        }
        // FOR SHARE: a concurrent projection update (the user's deletion)
        // waits for this order, or this order sees the deletion.
        let deleted: Option<bool> = known_users::table
            .find(new.user_id)
            .select(known_users::deleted)
            .for_share()
            .first(conn)
            .await
            .optional()?;
        match deleted {
            None => return Err(Error::UnknownUser(new.user_id)),
            Some(true) => return Err(Error::DeletedUser(new.user_id)),
            Some(false) => {}
        }
        let now = Utc::now();
        let row: OrderRow = diesel::insert_into(orders::table)
            .values((
                orders::id.eq(id),
                orders::user_id.eq(new.user_id),
                orders::status.eq(PENDING),
                orders::version.eq(1),
                orders::created_at.eq(now),
                orders::updated_at.eq(now),
            ))
            .returning(OrderRow::as_returning())
            .get_result(conn)
            .await?;
        let items: Vec<_> = new
            .lines
            .iter()
            .enumerate()
            .map(|(line, item)| {
                (
                    order_items::order_id.eq(id),
                    order_items::line.eq(i16::try_from(line).unwrap_or(i16::MAX)),
                    order_items::product_id.eq(&item.product_id),
                    order_items::quantity.eq(item.quantity),
                )
            })
            .collect();
        diesel::insert_into(order_items::table)
            .values(items)
            .execute(conn)
            .await?;
        tracing::Span::current().record("order.id", tracing::field::display(id));
        shop_outbox::enqueue(
            &*conn,
            &pb::OrderCreated {
                order_id: id.to_string(),
                version: row.version,
                user_id: new.user_id.to_string(),
                items: items_to_pb(&new.lines),
                occurred_at: Some(timestamp(now)),
            },
        )
        .await?;
        Ok(Order {
            row,
            lines: new.lines.clone(),
        })
    })
    .await
}

/// Cancels a pending order and writes `OrderCancelled`.
#[tracing::instrument(name = "db.cancel_order", skip_all, fields(db.system = "postgresql", order.id = %id))]
pub async fn cancel_order(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    expected_version: i64,
) -> Result<Order, Error> {
    conn.transaction(async |conn| {
        let current: OrderRow = orders::table
            .find(id)
            .select(OrderRow::as_select())
            .for_update()
            .first(conn)
            .await
            .optional()?
            .ok_or(Error::NotFound(id))?;
        if current.status == CANCELLED {
            return Err(Error::AlreadyCancelled(id));
        }
        StaleVersion::check("order", id, expected_version, current.version)?;
        let now = Utc::now();
        let row: OrderRow = diesel::update(orders::table.find(id))
            .set((
                orders::status.eq(CANCELLED),
                orders::version.eq(current.version + 1),
                orders::updated_at.eq(now),
            ))
            .returning(OrderRow::as_returning())
            .get_result(conn)
            .await?;
        shop_outbox::enqueue(
            &*conn,
            &pb::OrderCancelled {
                order_id: id.to_string(),
                version: row.version,
                user_id: row.user_id.to_string(),
                occurred_at: Some(timestamp(now)),
            },
        )
        .await?;
        let lines = lines_of(conn, &[id]).await?.remove(&id).unwrap_or_default();
        Ok(Order { row, lines })
    })
    .await
}

/// One order with its items, if it exists.
/// The user an order belongs to (it never changes), `None` for no such
/// order: what a user principal's ownership is checked against.
pub async fn owner(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Uuid>, Error> {
    Ok(orders::table
        .find(id)
        .select(orders::user_id)
        .first(conn)
        .await
        .optional()?)
}

pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<Order>, Error> {
    let Some(row) = orders::table
        .find(id)
        .select(OrderRow::as_select())
        .first(conn)
        .await
        .optional()?
    else {
        return Ok(None);
    };
    let lines = lines_of(conn, &[id]).await?.remove(&id).unwrap_or_default();
    Ok(Some(Order { row, lines }))
}

/// Up to `limit` orders of `user_id` placed after order `after`, with their
/// items (two queries, whatever the page size).
pub async fn list(
    conn: &mut AsyncPgConnection,
    user_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Order>, Error> {
    let mut query = orders::table
        .filter(orders::user_id.eq(user_id))
        .select(OrderRow::as_select())
        .order(orders::id.asc())
        .limit(limit)
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(orders::id.gt(after));
    }
    let rows: Vec<OrderRow> = query.load(conn).await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let mut lines = lines_of(conn, &ids).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let lines = lines.remove(&row.id).unwrap_or_default();
            Order { row, lines }
        })
        .collect())
}

async fn lines_of(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<OrderLine>>, Error> {
    let rows: Vec<(Uuid, String, i32)> = order_items::table
        .filter(order_items::order_id.eq_any(ids))
        .order((order_items::order_id, order_items::line))
        .select((
            order_items::order_id,
            order_items::product_id,
            order_items::quantity,
        ))
        .load(conn)
        .await?;
    let mut lines: HashMap<Uuid, Vec<OrderLine>> = HashMap::new();
    for (order_id, product_id, quantity) in rows {
        lines
            .entry(order_id)
            .or_default()
            .push(OrderLine { product_id, quantity });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lines: &[(&str, i32)]) -> NewOrder {
        NewOrder {
            user_id: Uuid::nil(),
            request_id: None,
            lines: lines
                .iter()
                .map(|(product_id, quantity)| OrderLine {
                    product_id: (*product_id).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }

    #[test]
    fn different_item_lists_never_share_a_fingerprint() {
        let pairs = [
            (order(&[("a:1|b", 2)]), order(&[("a", 1), ("b", 2)])),
            (order(&[("a\",\"b", 1)]), order(&[("a", 1), ("b", 1)])),
            (order(&[("x", 12)]), order(&[("x", 1), ("2", 1)])),
        ];
        for (one, other) in pairs {
            assert_ne!(one.fingerprint(), other.fingerprint(), "{one:?} / {other:?}");
        }
        assert_eq!(order(&[("a", 1)]).fingerprint(), order(&[("a", 1)]).fingerprint());
    }
}
