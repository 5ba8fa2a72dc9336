# Only for a templater run with --proxy and --register-service (default "ingress"): it
# registers the host's proxy as this service, with a TTL check that follows the templater.
# Add this policy to the templater's token of each host, INGRESS replaced by the service name
# and NODE by the host's Consul node name.

service "INGRESS" {
  policy = "write"
}

# /v1/agent/self: the agent's address and node name for the registration
agent "NODE" {
  policy = "read"
}
