//! The order service client.

use shop_contracts::order as pb;
use shop_contracts::order::order_service_client::OrderServiceClient;
use uuid::Uuid;

use crate::retry::{Repeat, TracedChannel, channel, with_retries};
use crate::{ClientConfig, Error, Order, Page};

/// Calls `shop.order.v1.OrderService`. Cheap to clone; clones share the
/// connection.
#[derive(Debug, Clone)]
pub struct OrderClient {
    inner: OrderServiceClient<TracedChannel>,
    config: ClientConfig,
}

impl OrderClient {
    /// A client for `config`; connects on the first call.
    pub fn connect(config: ClientConfig) -> Result<Self, Error> {
        Ok(Self {
            inner: OrderServiceClient::new(channel(&config)?),
            config,
        })
    }

    /// Places an order of `items` (product id, quantity) for a user. Retried
    /// safely: the request carries a request id generated here once.
    pub async fn create_order(&self, user_id: &str, items: &[(&str, i32)]) -> Result<Order, Error> {
        self.create_order_with_request_id(user_id, items, Uuid::new_v4())
            .await
    }

    /// Places an order with the caller's request id.
    pub async fn create_order_with_request_id(
        &self,
        user_id: &str,
        items: &[(&str, i32)],
        request_id: Uuid,
    ) -> Result<Order, Error> {
        let message = pb::CreateOrderRequest {
            user_id: user_id.to_owned(),
            items: items
                .iter()
                .map(|(product_id, quantity)| pb::OrderItem {
                    product_id: (*product_id).to_owned(),
                    quantity: *quantity,
                })
                .collect(),
            request_id: request_id.to_string(),
        };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.create_order(request).await }
        })
        .await?;
        order(response.order)
    }

    /// One order.
    pub async fn get_order(&self, id: &str) -> Result<Order, Error> {
        let message = pb::GetOrderRequest { id: id.to_owned() };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.get_order(request).await }
        })
        .await?;
        order(response.order)
    }

    /// One page of a user's orders in creation order.
    pub async fn list_orders(
        &self,
        user_id: &str,
        page_size: Option<i32>,
        page_token: &str,
    ) -> Result<Page<Order>, Error> {
        let message = pb::ListOrdersRequest {
            user_id: user_id.to_owned(),
            page_size,
            page_token: page_token.to_owned(),
        };
        let response = with_retries(&self.config, Repeat::Safe, message, |request| {
            let mut client = self.inner.clone();
            async move { client.list_orders(request).await }
        })
        .await?;
        Ok(Page {
            items: response.orders,
            next_page_token: response.next_page_token,
        })
    }

    /// Cancels an order seen at `expected_version`.
    pub async fn cancel_order(&self, id: &str, expected_version: i64) -> Result<Order, Error> {
        let message = pb::CancelOrderRequest {
            id: id.to_owned(),
            expected_version,
        };
        let response = with_retries(&self.config, Repeat::OnlyWhenUnavailable, message, |request| {
            let mut client = self.inner.clone();
            async move { client.cancel_order(request).await }
        })
        .await?;
        order(response.order)
    }
}

fn order(order: Option<Order>) -> Result<Order, Error> {
    order.ok_or_else(|| Error::Server {
        code: tonic::Code::Internal,
        message: "the response carries no order".to_owned(),
    })
}
