# Sourced by the relay benchmarks (bench-relay.sh, bench-limits.sh): the fast upstream they
# put duet in front of, and the request wrk sends.
#   start_relay_upstream WORK PORT: nginx on 127.0.0.1:PORT answering every
#     POST /v1/chat/completions with one fixed OpenAI completion (sets nginx_pid);
#     writes WORK/post.lua, a wrk script posting a small chat request.

start_relay_upstream() {
  local work="$1" port="$2"
  local answer='{"id":"chatcmpl-up","object":"chat.completion","created":1,"model":"fake","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from upstream"},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}'
  cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work;
  server {
    listen 127.0.0.1:$port;
    location /v1/chat/completions { default_type application/json; return 200 '$answer'; }
  }
}
NGINX
  nginx -c "$work/nginx.conf" & nginx_pid=$!
  cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"fake","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'
response = function(status, headers, body)
  if status ~= 200 then io.stderr:write("status " .. status .. "\n") end
end
LUA
}
