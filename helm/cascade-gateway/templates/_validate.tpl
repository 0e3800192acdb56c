{{/*
Rules that span several values. values.schema.json states the same rules where JSON Schema
can, but `helm install --skip-schema-validation` skips it: these `fail`s cannot be skipped.
*/}}
{{- define "cascade-gateway.validate" -}}
{{- $production := eq .Values.environment "production" }}
{{- if and $production .Values.sandbox.enabled }}
{{- fail "sandbox.enabled: true is refused when environment is production: the sandbox simulates cascade-core and the providers and must never run beside real money" }}
{{- end }}
{{- if and $production (not .Values.secrets.existingSecret) }}
{{- fail "secrets.existingSecret is required when environment is production: name the Secret holding DATABASE_URL, CORE_TOKEN, GATEWAY_API_TOKENS, OPS_API_TOKENS (and NATS_URL, UNLEASH_API_TOKEN when used)" }}
{{- end }}
{{- if and $production (not .Values.providers.existingSecret) }}
{{- fail "providers.existingSecret is required when environment is production: the providers file holds webhook secrets and must come from a Secret, not a ConfigMap" }}
{{- end }}
{{- if and .Values.providers.existingSecret .Values.providers.config }}
{{- fail "providers.existingSecret and providers.config are both set: choose one source for the providers file" }}
{{- end }}
{{- if and (not .Values.core.url) (not .Values.sandbox.enabled) }}
{{- fail "core.url is required (cascade-core's base URL) unless sandbox.enabled is true" }}
{{- end }}
{{- range $component := list "gateway" "worker" }}
{{- $scaling := (index $.Values $component).autoscaling }}
{{- if and $scaling.enabled (gt (int $scaling.minReplicas) (int $scaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is greater than maxReplicas (%v)" $component $scaling.minReplicas $scaling.maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
