{{/* Names and labels. Pods are selected by chart-owned labels (plus ray.io/group), never by ray.io/cluster: a
RayService's cluster name carries a random suffix that changes on every cluster upgrade. */}}
{{- define "dgserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dgserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dgserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dgserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dgserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dgserve
{{- end -}}

{{- define "dgserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The GPU worker groups the profile needs. */}}
{{- define "dgserve.gpuGroups" -}}
{{- if eq .Values.profile "disaggregated" -}}attention,expert{{- else -}}engine{{- end -}}
{{- end -}}

{{/* Ray node labels of the disaggregated groups; the topology's node_labels place the ranks by them. */}}
{{- define "dgserve.roleLabelKey" -}}dgserve.io/role{{- end -}}

{{- define "dgserve.drainFile" -}}/tmp/dgserve/drain{{- end -}}
{{- define "dgserve.tlsDir" -}}/etc/dgserve/tls{{- end -}}
{{- define "dgserve.keysDir" -}}/etc/dgserve/api-keys{{- end -}}
{{- define "dgserve.clientCaDir" -}}/etc/dgserve/client-ca{{- end -}}

{{/* The units' graceful shutdown (the topology's serve.graceful_shutdown_timeout_s, else max_request_s + 10). */}}
{{- define "dgserve.unitGraceSeconds" -}}
{{- $s := .Values.engine.serve | default dict -}}
{{- if $s.graceful_shutdown_timeout_s -}}
{{- $s.graceful_shutdown_timeout_s | int -}}
{{- else -}}
{{- add (($s.max_request_s | default 600) | int) 10 -}}
{{- end -}}
{{- end -}}

{{/* The project's topology config (cluster/config.py), rendered from values. */}}
{{- define "dgserve.topology" -}}
{{- $v := .Values -}}
{{- $t := dict "name" "dgserve" "profile" $v.profile "dtype" $v.model.dtype "experts_dtype" $v.model.expertsDtype
    "device" $v.model.device "attention_ranks" ($v.engine.attentionRanks | int)
    "expert_ranks" ($v.engine.expertRanks | int) "watchdog_s" $v.engine.watchdogSeconds -}}
{{- if $v.model.id }}{{ $_ := set $t "model" $v.model.id }}{{ end -}}
{{- if $v.model.revision }}{{ $_ := set $t "revision" $v.model.revision }}{{ end -}}
{{- $units := dict "min" ($v.engine.units.min | int) "max" ($v.engine.units.max | int) -}}
{{- if not (kindIs "invalid" $v.engine.units.initial) }}{{ $_ := set $units "initial" ($v.engine.units.initial | int) }}{{ end -}}
{{- $_ := set $t "units" $units -}}
{{- if $v.engine.expertMap }}{{ $_ := set $t "expert_map" $v.engine.expertMap }}{{ end -}}
{{- $_ := set $t "resources" (dict "attention" $v.engine.rankResources.attention "experts" $v.engine.rankResources.experts) -}}
{{- if eq $v.profile "disaggregated" -}}
{{- $key := include "dgserve.roleLabelKey" . -}}
{{- $_ := set $t "node_labels" (dict "attention" (dict $key "attention") "experts" (dict $key "expert")) -}}
{{- end -}}
{{- $_ := set $t "engine" ($v.engine.config | default dict) -}}
{{- $_ := set $t "sampler" ($v.engine.sampler | default dict) -}}
{{- $_ := set $t "serve" ($v.engine.serve | default dict) -}}
{{- $gw := dict "host" "0.0.0.0" "port" ($v.gateway.port | int) "replicas" ($v.gateway.replicas | int)
    "ray_resources" (dict "dgserve_gateway" 1) "grace_s" $v.gateway.graceSeconds
    "drain_file" (include "dgserve.drainFile" .) -}}
{{- if $v.tls.existingSecret -}}
{{- $_ := set $gw "tls_cert_file" (printf "%s/tls.crt" (include "dgserve.tlsDir" .)) -}}
{{- $_ := set $gw "tls_key_file" (printf "%s/tls.key" (include "dgserve.tlsDir" .)) -}}
{{- if $v.tls.clientCaSecret }}{{ $_ := set $gw "tls_client_ca_file" (printf "%s/ca.crt" (include "dgserve.clientCaDir" .)) }}{{ end -}}
{{- else -}}
{{- $_ := set $gw "insecure_remote" true -}}
{{- end -}}
{{- if $v.apiKeys.existingSecret }}{{ $_ := set $gw "api_keys_file" (printf "%s/%s" (include "dgserve.keysDir" .) $v.apiKeys.key) }}{{ end -}}
{{- $_ := set $t "gateway" (merge $gw ($v.gateway.config | default dict)) -}}
{{- $http := dict "enabled" $v.http.enabled -}}
{{- if $v.http.enabled -}}
{{- $http = dict "enabled" true "host" "0.0.0.0" "port" ($v.http.port | int) "route_prefix" $v.http.routePrefix
    "replicas" ($v.gateway.replicas | int) "ray_resources" (dict "dgserve_http" 1) -}}
{{- if $v.http.servedModelName }}{{ $_ := set $http "served_model_name" $v.http.servedModelName }}{{ end -}}
{{- end -}}
{{- $_ := set $t "http" $http -}}
{{- toYaml $t -}}
{{- end -}}

{{/* Ray Serve's config (the RayService's serveConfigV2): the proxies, and the dgserve application built by
dgserve.cluster.app:build from the topology. */}}
{{- define "dgserve.serveConfig" -}}
{{- $v := .Values -}}
{{- $serve := $v.engine.serve | default dict -}}
{{- $httpOpts := dict "host" "0.0.0.0" "port" ($v.http.port | int)
    "request_timeout_s" (add (($serve.max_request_s | default 600) | int) 5) -}}
{{- if and $v.tls.existingSecret $v.http.tls -}}
{{- $_ := set $httpOpts "ssl_certfile" (printf "%s/tls.crt" (include "dgserve.tlsDir" .)) -}}
{{- $_ := set $httpOpts "ssl_keyfile" (printf "%s/tls.key" (include "dgserve.tlsDir" .)) -}}
{{- end -}}
{{- $app := dict "name" "dgserve" "import_path" "dgserve.cluster.app:build"
    "args" (dict "topology" (include "dgserve.topology" . | fromYaml)) -}}
{{- if $v.http.enabled }}{{ $_ := set $app "route_prefix" $v.http.routePrefix }}{{ else }}{{ $_ := set $app "route_prefix" nil }}{{ end -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $httpOpts "applications" (list $app)) -}}
{{- end -}}

{{/* Fabric profiles: NCCL's env per fabric (values' fabric.env adds or overrides). */}}
{{- define "dgserve.fabricEnv" -}}
{{- $f := .Values.fabric -}}
{{- $env := dict "NCCL_SOCKET_IFNAME" "eth0" "GLOO_SOCKET_IFNAME" "eth0" "NCCL_CUMEM_ENABLE" "1" -}}
{{- if eq $f.profile "tcp" -}}
{{- $_ := set $env "NCCL_IB_DISABLE" "1" -}}
{{- else if eq $f.profile "ib" -}}
{{- $_ := set $env "NCCL_IB_HCA" "mlx5" -}}
{{- $_ := set $env "NCCL_NET_GDR_LEVEL" "PHB" -}}
{{- else if eq $f.profile "roce" -}}
{{- $_ := set $env "NCCL_IB_GID_INDEX" "3" -}}
{{- $_ := set $env "NCCL_SOCKET_IFNAME" "net1" -}}
{{- $_ := set $env "NCCL_IB_TIMEOUT" "22" -}}
{{- end -}}
{{- range $k, $val := ($f.env | default dict) }}{{ $_ := set $env $k (toString $val) }}{{ end -}}
{{- range $k := keys $env | sortAlpha }}
- name: {{ $k }}
  value: {{ get $env $k | quote }}
{{- end -}}
{{- end -}}

{{- define "dgserve.rdmaResourceName" -}}
{{- $f := .Values.fabric -}}
{{- if $f.rdmaResource.name -}}{{ $f.rdmaResource.name }}
{{- else if eq $f.profile "ib" -}}rdma/ib
{{- else if eq $f.profile "roce" -}}rdma/roce_gdr
{{- end -}}
{{- end -}}

{{/* Env of every Ray container. */}}
{{- define "dgserve.env" -}}
{{- $v := .Values -}}
{{- $serve := $v.engine.serve | default dict -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $v.modelCache.mountPath | quote }}
{{- if $v.model.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- if $v.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ $v.hfToken.existingSecret | quote }}, key: {{ $v.hfToken.key | quote }}}
{{- end }}
{{- range $k := list "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S" "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S" }}
- name: {{ $k }}
  value: {{ $serve.metrics_interval_s | default 10 | toString | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod (keys only on the gateway pods, which run the gateway and the HTTP ingress). */}}
{{- define "dgserve.volumes" -}}
{{- $v := .root.Values -}}
- name: model-cache
{{- if $v.modelCache.existingClaim }}
  persistentVolumeClaim: {claimName: {{ $v.modelCache.existingClaim | quote }}}
{{- else if $v.modelCache.create.enabled }}
  persistentVolumeClaim: {claimName: {{ printf "%s-model-cache" (include "dgserve.fullname" .root) | quote }}}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if $v.tls.existingSecret }}
- name: tls
  secret: {secretName: {{ $v.tls.existingSecret | quote }}}
{{- end }}
{{- if and $v.tls.clientCaSecret .gateway }}
- name: client-ca
  secret: {secretName: {{ $v.tls.clientCaSecret | quote }}}
{{- end }}
{{- if and $v.apiKeys.existingSecret .gateway }}
- name: api-keys
  secret: {secretName: {{ $v.apiKeys.existingSecret | quote }}}
{{- end }}
{{- end -}}

{{- define "dgserve.volumeMounts" -}}
{{- $v := .root.Values -}}
- {name: model-cache, mountPath: {{ $v.modelCache.mountPath | quote }}}
{{- if $v.tls.existingSecret }}
- {name: tls, mountPath: {{ include "dgserve.tlsDir" .root | quote }}, readOnly: true}
{{- end }}
{{- if and $v.tls.clientCaSecret .gateway }}
- {name: client-ca, mountPath: {{ include "dgserve.clientCaDir" .root | quote }}, readOnly: true}
{{- end }}
{{- if and $v.apiKeys.existingSecret .gateway }}
- {name: api-keys, mountPath: {{ include "dgserve.keysDir" .root | quote }}, readOnly: true}
{{- end }}
{{- end -}}
