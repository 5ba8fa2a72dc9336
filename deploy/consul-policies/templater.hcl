# The templater: reads the catalog and health of every service and node, and the KV prefixes
# its templates use (replace PREFIX; drop the key_prefix block when templates read no KV; the
# bundled templates' blue-green splits and basic-auth users, --var weights_prefix=routes/ and
# --var auth_prefix=routes/, read "routes/").
# consul acl policy create -name templater -rules @templater.hcl

service_prefix "" {
  policy = "read"
}

node_prefix "" {
  policy = "read"
}

key_prefix "PREFIX" {
  policy = "read"
}
