DROP TABLE create_user_requests;
DROP TABLE users;
