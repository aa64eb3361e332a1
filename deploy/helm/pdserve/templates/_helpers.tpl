{{/* Names ------------------------------------------------------------------ */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.fullname" -}}
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

{{- define "pdserve.routerName" -}}
{{- printf "%s-router" (include "pdserve.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
RayCluster name. KubeRay names the head Service "<cluster>-head-svc" and cuts names longer
than 50 characters from the front, so the cluster name stays within 41 characters and the
router's --ray-address is exactly the Service KubeRay creates.
*/}}
{{- define "pdserve.rayClusterName" -}}
{{- include "pdserve.fullname" . | trunc 41 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.rayHeadService" -}}
{{- printf "%s-head-svc" (include "pdserve.rayClusterName" .) }}
{{- end }}

{{- define "pdserve.rayAddress" -}}
{{- printf "ray://%s:%d" (include "pdserve.rayHeadService" .) (int .Values.ray.clientPort) }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* Image ------------------------------------------------------------------ */}}

{{- define "pdserve.gpuEnabled" -}}
{{- if or (gt (float64 .Values.prefill.gpus) 0.0) (gt (float64 .Values.decode.gpus) 0.0) }}true{{ end }}
{{- end }}

{{- define "pdserve.image" -}}
{{- $variant := ternary "cuda" "cpu" (eq (include "pdserve.gpuEnabled" .) "true") }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Model ------------------------------------------------------------------ */}}

{{/* The --model directory, identical on the router and on every worker pod. */}}
{{- define "pdserve.modelPath" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "default" }}
{{- printf "%s/models/SmolLM2-135M-Instruct" (trimSuffix "/" $m.defaultModel.cacheDir) }}
{{- else if eq $m.source "pvc" }}
{{- if not $m.pvc.claimName }}{{ fail "model.source=pvc needs model.pvc.claimName" }}{{ end }}
{{- if $m.path }}
{{- printf "%s/%s" (trimSuffix "/" $m.pvc.mountPath) (trimPrefix "/" $m.path) }}
{{- else }}
{{- $m.pvc.mountPath }}
{{- end }}
{{- else if eq $m.source "image" }}
{{- if not (hasPrefix "/" $m.path) }}{{ fail "model.source=image needs model.path, an absolute path inside the image" }}{{ end }}
{{- $m.path }}
{{- else }}
{{- fail (printf "model.source must be default, pvc or image, got %q" $m.source) }}
{{- end }}
{{- end }}

{{/* Pod volumes that hold the model (none for source=image). */}}
{{- define "pdserve.modelVolumes" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "default" }}
- name: model-cache
  emptyDir:
    sizeLimit: {{ $m.defaultModel.sizeLimit }}
{{- else if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "pdserve.modelVolumeMounts" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "default" }}
- name: model-cache
  mountPath: {{ $m.defaultModel.cacheDir }}
  readOnly: true
{{- else if eq $m.source "pvc" }}
- name: model
  mountPath: {{ $m.pvc.mountPath }}
  readOnly: true
  {{- with $m.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* source=default: convert the embedded GGUF once per pod before the main container. */}}
{{- define "pdserve.modelInitContainers" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "default" }}
- name: prepare-default-model
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["pdserve", "prepare-default-model"]
  env:
    - name: PDSERVE_CACHE_DIR
      value: {{ $m.defaultModel.cacheDir | quote }}
    - name: PDSERVE_NO_PROGRESS
      value: "1"
  resources:
    {{- toYaml $m.defaultModel.initResources | nindent 4 }}
  volumeMounts:
    - name: model-cache
      mountPath: {{ $m.defaultModel.cacheDir }}
{{- end }}
{{- end }}

{{/* Environment every pdserve process (router and Ray pods) shares. */}}
{{- define "pdserve.commonEnv" -}}
- name: PDSERVE_LOG_LEVEL
  value: {{ .Values.serve.logLevel | quote }}
- name: PDSERVE_NO_PROGRESS
  value: "1"
{{- if eq .Values.model.source "default" }}
- name: PDSERVE_CACHE_DIR
  value: {{ .Values.model.defaultModel.cacheDir | quote }}
{{- end }}
{{- end }}

{{/* Workers ---------------------------------------------------------------- */}}

{{- define "pdserve.numWorkers" -}}
{{- mul (int .replicas) (int .workersPerPod) }}
{{- end }}

{{/* --gpus-per-worker: explicit, or each group's GPUs per pod / actors per pod. */}}
{{- define "pdserve.gpusPerWorker" -}}
{{- if not (kindIs "invalid" .Values.serve.gpusPerWorker) }}
{{- .Values.serve.gpusPerWorker }}
{{- else }}
{{- $p := divf .Values.prefill.gpus .Values.prefill.workersPerPod }}
{{- $d := divf .Values.decode.gpus .Values.decode.workersPerPod }}
{{- if ne $p $d }}
{{- fail (printf "prefill (%v) and decode (%v) differ in GPUs per worker; set serve.gpusPerWorker" $p $d) }}
{{- end }}
{{- $p }}
{{- end }}
{{- end }}

{{/*
rayStartParams.resources for a group: KubeRay passes the value to `ray start --resources=`
through a shell, so it is a JSON object inside double quotes with escaped inner quotes:
'"{\"pdserve_prefill\":1000}"'.
*/}}
{{- define "pdserve.rayResourcesParam" -}}
{{- dict .name (int .amount) | toJson | quote | squote }}
{{- end }}

{{/* Container resources with the group's GPUs added to requests and limits. */}}
{{- define "pdserve.workerResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (float64 .gpus) 0.0 }}
{{- $req := default dict $res.requests }}
{{- $lim := default dict $res.limits }}
{{- $_ := set $req "nvidia.com/gpu" (toString (int .gpus)) }}
{{- $_ = set $lim "nvidia.com/gpu" (toString (int .gpus)) }}
{{- $_ = set $res "requests" $req }}
{{- $_ = set $res "limits" $lim }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* One entry of RayCluster.spec.workerGroupSpecs; called with (dict "root" $ "role" "prefill"). */}}
{{- define "pdserve.workerGroup" -}}
{{- $root := .root }}
{{- $g := index $root.Values .role }}
- groupName: {{ .role }}
  replicas: {{ int $g.replicas }}
  minReplicas: {{ int $g.replicas }}
  maxReplicas: {{ int $g.replicas }}
  rayStartParams:
    resources: {{ include "pdserve.rayResourcesParam" $g.rayResource }}
    {{- range $k, $v := omit $g.rayStartParams "resources" }}
    {{ $k }}: {{ toString $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .role }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (include "pdserve.modelInitContainers" $root) }}
      initContainers:
        {{- . | trim | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "pdserve.commonEnv" $root | trim | nindent 12 }}
            {{- with $g.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: 8080
          resources:
            {{- include "pdserve.workerResources" $g | nindent 12 }}
          lifecycle:
            preStop:
              exec:
                command: ["/bin/sh", "-c", "ray stop"]
          volumeMounts:
            - name: dshm
              mountPath: /dev/shm
            {{- with (include "pdserve.modelVolumeMounts" $root) }}
            {{- . | trim | nindent 12 }}
            {{- end }}
      volumes:
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $g.shmSize }}
        {{- with (include "pdserve.modelVolumes" $root) }}
        {{- . | trim | nindent 8 }}
        {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* API key ---------------------------------------------------------------- */}}

{{- define "pdserve.apiKeySecretName" -}}
{{- if and .Values.apiKey.existingSecret .Values.apiKey.value }}
{{- fail "set apiKey.value or apiKey.existingSecret, not both" }}
{{- end }}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "pdserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Router command --------------------------------------------------------- */}}

{{/* `pdserve serve` argv as a YAML list (a test parses it with pdserve.cli.build_parser). */}}
{{- define "pdserve.serveCommand" -}}
{{- $v := .Values }}
- pdserve
- serve
- --ray-address
- {{ include "pdserve.rayAddress" . | quote }}
- --model
- {{ include "pdserve.modelPath" . | quote }}
{{- with $v.model.servedModelName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
- --prefill
- {{ include "pdserve.numWorkers" $v.prefill | quote }}
- --decode
- {{ include "pdserve.numWorkers" $v.decode | quote }}
- --prefill-ray-resource
- {{ $v.prefill.rayResource.name | quote }}
- --decode-ray-resource
- {{ $v.decode.rayResource.name | quote }}
- --transport
- {{ $v.serve.transport | quote }}
- --gpus-per-worker
- {{ include "pdserve.gpusPerWorker" . | quote }}
- --cpus-per-worker
- {{ toString $v.serve.cpusPerWorker | quote }}
- --kv-cache-gb
- {{ toString $v.serve.kvCacheGb | quote }}
- --dtype
- {{ $v.serve.dtype | quote }}
- --host
- "0.0.0.0"
- --grpc-port
- {{ $v.router.grpcPort | int | toString | quote }}
- --http-port
- {{ $v.router.httpPort | int | toString | quote }}
{{- range $v.serve.extraArgs }}
- {{ toString . | quote }}
{{- end }}
{{- end }}
