import type { ChannelOptions } from '@grpc/grpc-js';

/**
 * Largest message either side accepts. Log chunks are at most 128 KiB and results are small; 16 MiB leaves room
 * for a Hello listing thousands of running leases without letting a broken peer exhaust memory.
 */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

/** Largest log payload in one LogChunk; small enough that a chunk never delays a heartbeat noticeably. */
export const LOG_CHUNK_BYTES = 128 * 1024;

// HTTP/2 pings every 20 s detect a dead TCP connection behind NAT long before the OS would (minutes to hours).
const KEEPALIVE_TIME_MS = 20_000;
const KEEPALIVE_TIMEOUT_MS = 10_000;

export const serverChannelOptions: ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_time_ms': KEEPALIVE_TIME_MS,
  'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS,
  'grpc.keepalive_permit_without_calls': 1,
  // Agents ping every KEEPALIVE_TIME_MS; allow that without the server answering GOAWAY "too_many_pings".
  'grpc.http2.min_ping_interval_without_data_ms': KEEPALIVE_TIME_MS / 2,
};

export const clientChannelOptions: ChannelOptions = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_time_ms': KEEPALIVE_TIME_MS,
  'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS,
  'grpc.keepalive_permit_without_calls': 1,
  // The stream lives for hours; the default retry buffer copies every sent message and slows it 5–12×.
  'grpc.per_rpc_retry_buffer_size': 0,
  'grpc.enable_retries': 0,
};
