//! The rules an order request must meet, checked before any database work.
//! The generic checks (ids, versions, pages) are in
//! `shop_host::validate`.

use std::collections::HashSet;

use shop_contracts::order as pb;
pub use shop_host::validate::{
    FieldViolations, expected_version, optional_uuid, page_after, page_size, uuid,
};
use uuid::Uuid;

use crate::store::{NewOrder, OrderLine};

/// Most items in one order.
pub const MAX_ITEMS: usize = 100;
/// Longest product id, in characters.
pub const PRODUCT_ID_MAX: usize = 100;
/// Largest quantity of one item.
pub const MAX_QUANTITY: i32 = 1000;

fn product_id(field: &str, value: &str, violations: &mut FieldViolations) {
    if value.is_empty() {
        violations.add(field, "is required");
    } else if value.chars().count() > PRODUCT_ID_MAX {
        violations.add(field, format!("must be at most {PRODUCT_ID_MAX} characters"));
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        violations.add(field, "must not contain whitespace or control characters");
    }
}

impl TryFrom<pb::CreateOrderRequest> for NewOrder {
    type Error = FieldViolations;

    fn try_from(request: pb::CreateOrderRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let user_id = uuid("user_id", &request.user_id, &mut violations);
        let request_id = optional_uuid("request_id", &request.request_id, &mut violations);
        if request.items.is_empty() {
            violations.add("items", "must contain at least one item");
        } else if request.items.len() > MAX_ITEMS {
            violations.add("items", format!("must contain at most {MAX_ITEMS} items"));
        }
        let mut seen = HashSet::new();
        for (index, item) in request.items.iter().enumerate().take(MAX_ITEMS) {
            let field = format!("items[{index}].product_id");
            product_id(&field, &item.product_id, &mut violations);
            if !item.product_id.is_empty() && !seen.insert(item.product_id.as_str()) {
                violations.add(&field, "appears more than once in the order");
            }
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                violations.add(
                    format!("items[{index}].quantity"),
                    format!("must be between 1 and {MAX_QUANTITY}"),
                );
            }
        }
        violations.check()?;
        Ok(NewOrder {
            user_id,
            request_id,
            lines: request
                .items
                .into_iter()
                .map(|item| OrderLine {
                    product_id: item.product_id,
                    quantity: item.quantity,
                })
                .collect(),
        })
    }
}

/// The id of a `GetOrder`.
pub fn get_order(request: &pb::GetOrderRequest) -> Result<Uuid, FieldViolations> {
    let mut violations = FieldViolations::new();
    let id = uuid("id", &request.id, &mut violations);
    violations.check().map(|()| id)
}

/// A validated `CancelOrder`.
#[derive(Debug, Clone, Copy)]
pub struct Cancellation {
    /// The order.
    pub id: Uuid,
    /// The version the caller saw.
    pub expected_version: i64,
}

impl TryFrom<pb::CancelOrderRequest> for Cancellation {
    type Error = FieldViolations;

    fn try_from(request: pb::CancelOrderRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let cancellation = Cancellation {
            id: uuid("id", &request.id, &mut violations),
            expected_version: expected_version("expected_version", request.expected_version, &mut violations),
        };
        violations.check().map(|()| cancellation)
    }
}

/// A validated `ListOrders`.
#[derive(Debug, Clone, Copy)]
pub struct OrdersPage {
    /// Whose orders.
    pub user_id: Uuid,
    /// Rows per page.
    pub size: i64,
    /// Last id of the previous page.
    pub after: Option<Uuid>,
}

impl TryFrom<pb::ListOrdersRequest> for OrdersPage {
    type Error = FieldViolations;

    fn try_from(request: pb::ListOrdersRequest) -> Result<Self, FieldViolations> {
        let mut violations = FieldViolations::new();
        let page = OrdersPage {
            user_id: uuid("user_id", &request.user_id, &mut violations),
            size: page_size("page_size", request.page_size, &mut violations),
            after: page_after("page_token", &request.page_token, &mut violations),
        };
        violations.check().map(|()| page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product_id: &str, quantity: i32) -> pb::OrderItem {
        pb::OrderItem {
            product_id: product_id.to_owned(),
            quantity,
        }
    }

    fn fields(request: pb::CreateOrderRequest) -> Vec<String> {
        match NewOrder::try_from(request) {
            Ok(_) => Vec::new(),
            Err(violations) => violations.fields().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn a_valid_order_passes() {
        let request = pb::CreateOrderRequest {
            user_id: Uuid::now_v7().to_string(),
            items: vec![item("sku-1", 1), item("sku-2", 1000)],
            request_id: String::new(),
        };
        assert!(fields(request).is_empty());
    }

    #[test]
    fn every_bad_item_field_is_reported_with_its_index() {
        let request = pb::CreateOrderRequest {
            user_id: "nope".to_owned(),
            items: vec![
                item("", 0),
                item("sku 2", 1001),
                item("dup", 1),
                item("dup", 1),
                item(&"x".repeat(101), 5),
            ],
            request_id: "also-nope".to_owned(),
        };
        assert_eq!(
            fields(request),
            [
                "user_id",
                "request_id",
                "items[0].product_id",
                "items[0].quantity",
                "items[1].product_id",
                "items[1].quantity",
                "items[3].product_id",
                "items[4].product_id",
            ]
        );
    }

    #[test]
    fn item_count_is_bounded() {
        let none = pb::CreateOrderRequest {
            user_id: Uuid::now_v7().to_string(),
            items: Vec::new(),
            request_id: String::new(),
        };
        assert_eq!(fields(none), ["items"]);
        let too_many = pb::CreateOrderRequest {
            user_id: Uuid::now_v7().to_string(),
            items: (0..101).map(|i| item(&format!("sku-{i}"), 1)).collect(),
            request_id: String::new(),
        };
        assert_eq!(fields(too_many), ["items"]);
    }
}
