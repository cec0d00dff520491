-- Shared by the load test's wrk scripts (scripts/loadtest.sh): the request every scenario
-- sends and the one-line result the script parses.
--
-- The body is the benches' charge request (benches/common/handler.rs), about 200 bytes.

local common = {}

common.headers = {
  ["Host"] = "api.example.com",
  ["User-Agent"] = "bench-client/1.0",
  ["Accept"] = "application/json",
  ["Authorization"] = "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc",
  ["Content-Type"] = "application/json",
}

function common.body(order)
  return string.format(
    '{"amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3",' ..
    '"description":"Two flat whites and a croissant",' ..
    '"metadata":{"order_id":"ord_%016x","channel":"web"},"capture":true}', order)
end

-- setup() runs in the main state once per thread: number the threads.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

-- init() runs in each thread's state with the arguments after `--`: the run's id, which
-- makes keys and bodies unique across runs (a Redis that outlived a run never replays them).
function init(args)
  run_id = args[1] or "run"
  counter = 0
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d non2xx=%d rps=%.1f p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(99)))
end

return common
