{{/* Names and labels. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Redis: the URL the workers use ("" = no Redis tier) and the Secret holding its password. */}}
{{- define "tandem.redisFullname" -}}
{{- printf "%s-redis" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "tandem.redisFullname" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- include "tandem.redisFullname" . -}}
{{- end -}}
{{- end -}}

{{/* The custom Ray resource that pins a deployment to its group: tandem_<group>. */}}
{{- define "tandem.groupResource" -}}
{{- printf "tandem_%s" (. | replace "-" "_") -}}
{{- end -}}

{{/* Router replicas (serve.deployments.Router.num_replicas, default 1): they share the gRPC port on the head. */}}
{{- define "tandem.routerReplicas" -}}
{{- $router := default dict (get .Values.serve.deployments "Router") -}}
{{- int (default 1 (get $router "num_replicas")) -}}
{{- end -}}

{{/*
The Serve config (serveConfigV2): serve.args and serve.deployments as given, plus the router's
bind address and port, prefix_store.url, and the placement resources of every deployment.
*/}}
{{- define "tandem.serveConfig" -}}
{{- $args := deepCopy .Values.serve.args -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "port" (int .Values.service.grpcPort) -}}
{{- $redisUrl := include "tandem.redisUrl" . -}}
{{- if $redisUrl -}}
{{- $store := deepCopy (default dict (get $args "prefix_store")) -}}
{{- $_ := set $store "url" $redisUrl -}}
{{- $_ := set $args "prefix_store" $store -}}
{{- else -}}
{{- $_ := unset $args "prefix_store" -}}
{{- end -}}
{{- $placement := dict "Router" "tandem_router" -}}
{{- range $group, $spec := .Values.rayCluster.workerGroups -}}
{{- $_ := set $placement $spec.deployment (include "tandem.groupResource" $group) -}}
{{- end -}}
{{- $deployments := list -}}
{{- range $name, $options := .Values.serve.deployments -}}
{{- $entry := deepCopy $options -}}
{{- $_ := set $entry "name" $name -}}
{{- if hasKey $placement $name -}}
{{- $actor := deepCopy (default dict (get $entry "ray_actor_options")) -}}
{{- $resources := deepCopy (default dict (get $actor "resources")) -}}
{{- $_ := set $resources (get $placement $name) 1 -}}
{{- $_ := set $actor "resources" $resources -}}
{{- $_ := set $entry "ray_actor_options" $actor -}}
{{- end -}}
{{- $deployments = append $deployments $entry -}}
{{- end -}}
{{- $app := dict "name" .Values.serve.appName "route_prefix" nil "import_path" .Values.serve.importPath "args" $args "deployments" $deployments -}}
{{- $config := dict "proxy_location" .Values.serve.proxyLocation "http_options" (dict "host" .Values.serve.httpHost) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The OTLP endpoint of the Ray pods: otel.endpoint, else the chart's collector, else "" (off). */}}
{{- define "tandem.otelEndpoint" -}}
{{- if .Values.otel.endpoint -}}
{{- .Values.otel.endpoint -}}
{{- else if .Values.otel.collector.enabled -}}
{{- printf "http://%s-otel-collector.%s.svc:4317" (include "tandem.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray container: metrics bind address, tracing, Redis password. */}}
{{- define "tandem.rayEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: TANDEM_METRICS_HOST
  value: "0.0.0.0"
- name: TANDEM_METRICS_PORT
  value: {{ .Values.service.metricsPort | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME),service.instance.id=$(POD_NAME)" .Release.Namespace | quote }}
{{- $endpoint := include "tandem.otelEndpoint" . }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
- name: OTEL_EXPORTER_OTLP_INSECURE
  value: {{ .Values.otel.insecure | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplingRatio | quote }}
{{- end }}
{{- if include "tandem.redisSecretName" . }}
- name: TANDEM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretPasswordKey }}
{{- end }}
{{- if .Values.auth.existingSecret }}
- name: TANDEM_API_KEYS_FILE
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.auth.mountPath) .Values.auth.apiKeysKey | quote }}
{{- if .Values.auth.adminKeysKey }}
- name: TANDEM_ADMIN_API_KEYS_FILE
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.auth.mountPath) .Values.auth.adminKeysKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.rayCluster.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The API-key Secret (auth.existingSecret) as a volume of every Ray pod, and its read-only
mount (the files keep Kubernetes' default mode: the Ray image's user is not root). Included only
when auth.existingSecret is set. */}}
{{- define "tandem.authVolume" -}}
- name: api-keys
  secret:
    secretName: {{ .Values.auth.existingSecret }}
    items:
      - {key: {{ .Values.auth.apiKeysKey }}, path: {{ .Values.auth.apiKeysKey }}}
      {{- if .Values.auth.adminKeysKey }}
      - {key: {{ .Values.auth.adminKeysKey }}, path: {{ .Values.auth.adminKeysKey }}}
      {{- end }}
{{- end -}}

{{- define "tandem.authVolumeMount" -}}
- {name: api-keys, mountPath: {{ .Values.auth.mountPath }}, readOnly: true}
{{- end -}}

{{/* Volumes for Ray's shared memory (the object store). */}}
{{- define "tandem.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.rayCluster.shmSize }}
{{- end -}}

{{/* Fail early on values that would deploy but never reach their replica counts. */}}
{{- define "tandem.checks" -}}
{{- range $group, $spec := .Values.rayCluster.workerGroups -}}
{{- $options := get $.Values.serve.deployments $spec.deployment -}}
{{- if not $options -}}
{{- fail (printf "rayCluster.workerGroups.%s.deployment: %s has no entry in serve.deployments" $group $spec.deployment) -}}
{{- end -}}
{{- $autoscaling := default dict (get $options "autoscaling_config") -}}
{{- $wanted := int (default (get $options "num_replicas" | default 1) (get $autoscaling "max_replicas")) -}}
{{- $capacity := mul (int $spec.maxReplicas) (int $spec.replicasPerPod) -}}
{{- if lt (int $capacity) $wanted -}}
{{- fail (printf "rayCluster.workerGroups.%s: maxReplicas x replicasPerPod leaves room for %d replicas, but %s may scale to %d" $group (int $capacity) $spec.deployment $wanted) -}}
{{- end -}}
{{- if gt (int $spec.minReplicas) (int $spec.maxReplicas) -}}
{{- fail (printf "rayCluster.workerGroups.%s: minReplicas > maxReplicas" $group) -}}
{{- end -}}
{{- end -}}
{{- end -}}
