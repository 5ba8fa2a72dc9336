# Only for a templater run with --proxy and --register-service (default "ingress"): it
# registers the host's proxy as this service, with a TTL check that follows the templater.
# Add this policy to the templater's token, with INGRESS replaced by the service name.

service "INGRESS" {
  policy = "write"
}
