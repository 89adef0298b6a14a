DROP TABLE create_order_requests;
DROP TABLE order_items;
DROP TABLE orders;
