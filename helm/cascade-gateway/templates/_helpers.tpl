{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "cascade-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cascade-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", kept within 63 characters. Call with (list $ "suffix"). */}}
{{- define "cascade-gateway.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "cascade-gateway.fullname" $root | trunc (int (sub 62 (len $suffix)))) $suffix | trimSuffix "-" }}
{{- end }}

{{- define "cascade-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cascade-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cascade-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cascade-gateway.secretName" -}}
{{- default (include "cascade-gateway.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "cascade-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cascade-gateway.labels" -}}
helm.sh/chart: {{ include "cascade-gateway.chart" . }}
{{ include "cascade-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cascade-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component. Call with (list $ "gateway"). */}}
{{- define "cascade-gateway.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "cascade-gateway.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "cascade-gateway.componentSelectorLabels" -}}
{{- $root := index . 0 -}}
{{ include "cascade-gateway.selectorLabels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image ------------------------------------------------------------------------------ */}}

{{- define "cascade-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Configuration ---------------------------------------------------------------------- */}}

{{- define "cascade-gateway.publicUrl" -}}
{{- if .Values.gateway.publicUrl }}
{{- .Values.gateway.publicUrl | trimSuffix "/" }}
{{- else }}
{{- printf "http://%s.%s.svc:%v" (include "cascade-gateway.componentName" (list . "gateway")) .Release.Namespace .Values.gateway.service.port }}
{{- end }}
{{- end }}

{{- define "cascade-gateway.flagsConfigMap" -}}
{{- default (include "cascade-gateway.componentName" (list . "flags")) .Values.flags.existingConfigMap }}
{{- end }}

{{/* Where PROVIDERS_FILE points inside the container. */}}
{{- define "cascade-gateway.providersFile" -}}
{{- if or .Values.providers.existingSecret .Values.providers.config (not .Values.sandbox.enabled) -}}
/etc/cascade-gateway/providers/{{ .Values.providers.key }}
{{- else -}}
{{- /* sandbox without providers of its own: the simulated providers shipped in the image */ -}}
/app/config/providers.sandbox.json
{{- end }}
{{- end }}

{{- define "cascade-gateway.providersMounted" -}}
{{- if or .Values.providers.existingSecret .Values.providers.config (not .Values.sandbox.enabled) }}true{{ end }}
{{- end }}

{{/* One env entry read from the Secret. Call with (list $ "ENV_NAME"). */}}
{{- define "cascade-gateway.secretEnv" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 -}}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cascade-gateway.secretName" $root }}
      key: {{ index $root.Values.secrets.keys $name | quote }}
{{- end }}

{{/* Environment shared by the gateway and the workers (not the migration Job). */}}
{{- define "cascade-gateway.commonEnv" -}}
- name: DEPLOYMENT_ENV
  value: {{ .Values.environment | quote }}
- name: SANDBOX_ENABLED
  value: {{ .Values.sandbox.enabled | quote }}
- name: HTTP_HOST
  value: "0.0.0.0"
- name: PUBLIC_URL
  value: {{ include "cascade-gateway.publicUrl" . | quote }}
- name: LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: PROVIDERS_FILE
  value: {{ include "cascade-gateway.providersFile" . | quote }}
- name: NATS_NAMESPACE
  value: {{ .Values.nats.namespace | quote }}
- name: JETSTREAM_REPLICAS
  value: {{ .Values.nats.jetstream.replicas | quote }}
- name: JETSTREAM_ACK_WAIT_SECONDS
  value: {{ .Values.nats.jetstream.ackWaitSeconds | quote }}
{{- if .Values.core.url }}
- name: CORE_URL
  value: {{ .Values.core.url | quote }}
{{- end }}
{{- if .Values.nats.url }}
- name: NATS_URL
  value: {{ .Values.nats.url | quote }}
{{- else }}
{{ include "cascade-gateway.secretEnv" (list . "NATS_URL") }}
{{- end }}
{{ include "cascade-gateway.secretEnv" (list . "DATABASE_URL") }}
{{ include "cascade-gateway.secretEnv" (list . "CORE_TOKEN") }}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level pieces ------------------------------------------------------------------- */}}

{{- define "cascade-gateway.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "cascade-gateway.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* Scheduling shared by the Deployments. Call with (list $ "gateway"). */}}
{{- define "cascade-gateway.scheduling" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- with $root.Values.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $root.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $root.Values.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ $root.Values.topologySpread.zoneWhenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "cascade-gateway.componentSelectorLabels" (list $root $component) | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
  - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $root.Values.topologySpread.hostnameWhenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "cascade-gateway.componentSelectorLabels" (list $root $component) | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}

{{/* Prometheus ------------------------------------------------------------------------- */}}

{{/* The label matcher that keeps rules to this release's namespace. */}}
{{- define "cascade-gateway.promScope" -}}
namespace="{{ .Release.Namespace }}"
{{- end }}

{{/* The providers file volume: the Secret (production) or the dev ConfigMap. */}}
{{- define "cascade-gateway.providersVolume" -}}
- name: providers
  {{- if .Values.providers.existingSecret }}
  secret:
    secretName: {{ .Values.providers.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.providers.key }}
        path: {{ .Values.providers.key }}
  {{- else }}
  configMap:
    name: {{ include "cascade-gateway.componentName" (list . "providers") }}
    items:
      - key: {{ .Values.providers.key }}
        path: {{ .Values.providers.key }}
  {{- end }}
{{- end }}
