-- Where a chat's model answers: auto, cpu, cuda or cuda:N (src/device.rs). Chats made before
-- this column existed answered on the CPU, and keep doing so.
ALTER TABLE chats ADD COLUMN device TEXT NOT NULL DEFAULT 'cpu';
