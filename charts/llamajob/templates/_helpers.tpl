{{/* Names are truncated to 63 characters: the limit of a label value and a DNS label. */}}
{{- define "llamajob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llamajob.fullname" -}}
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

{{/* Cluster-scoped objects carry the release namespace so two releases never collide. */}}
{{- define "llamajob.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "llamajob.fullname" .) -}}
{{- end -}}

{{- define "llamajob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llamajob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "llamajob.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llamajob.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llamajob
{{- end -}}

{{- define "llamajob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llamajob.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llamajob.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* family=image pairs of the trainer images, as a JSON list, for `--trainer-image`: a
family's own reference, else <trainerImage.repository>:<tag>-<family>, else none. */}}
{{- define "llamajob.trainerImages" -}}
{{- $t := .Values.trainerImage -}}
{{- $tag := default .Chart.AppVersion $t.tag -}}
{{- $pairs := list -}}
{{- range $family := list "neuron" "trn1" "cuda" -}}
{{- $ref := get $t $family -}}
{{- if and (not $ref) $t.repository -}}
{{- $ref = printf "%s:%s-%s" $t.repository $tag $family -}}
{{- end -}}
{{- if $ref -}}
{{- $pairs = append $pairs (printf "%s=%s" $family $ref) -}}
{{- end -}}
{{- end -}}
{{- toJson $pairs -}}
{{- end -}}

{{/* The namespaces watched in `namespace` scope, as a JSON list (templates cannot return lists). */}}
{{- define "llamajob.watchNamespaces" -}}
{{- if .Values.operator.watch.namespaces -}}
{{- toJson .Values.operator.watch.namespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{- define "llamajob.clusterScope" -}}
{{- if eq .Values.operator.watch.scope "cluster" -}}true{{- end -}}
{{- end -}}

{{- define "llamajob.peeringName" -}}
{{- default (include "llamajob.fullname" .) .Values.operator.peering.name -}}
{{- end -}}

{{/* Monitoring CRD objects need both the values and the Prometheus Operator's API. */}}
{{- define "llamajob.monitoringApi" -}}
{{- if and .Values.monitoring.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}true{{- end -}}
{{- end -}}

{{/* Checks that span several values; values.schema.json covers the shape of each one. */}}
{{- define "llamajob.validate" -}}
{{- if not .Values.image.repository -}}
{{- fail (printf "image.repository is not set: no llamajob image is published, so build the operator image from the repository's Dockerfile and push it to a registry your cluster pulls from:\n  docker build --target operator -t <registry>/llamajob-operator:%s . && docker push <registry>/llamajob-operator:%s\nthen install with --set image.repository=<registry>/llamajob-operator (and --set trainerImage.repository=<registry>/llamajob-trainer for the trainer images). See docs/install.md, \"Building the images\"" .Chart.AppVersion .Chart.AppVersion) -}}
{{- end -}}
{{- if eq .Values.image.tag "latest" -}}
{{- fail "image.tag: `latest` is not allowed because it changes under a running release; pin a version such as 0.1.0 (or leave it empty for the chart's appVersion)" -}}
{{- end -}}
{{- if eq (int .Values.operator.livenessPort) (int .Values.operator.metricsPort) -}}
{{- fail (printf "operator.livenessPort and operator.metricsPort are both %v; give them different ports" .Values.operator.livenessPort) -}}
{{- end -}}
{{- if and (include "llamajob.clusterScope" .) .Values.operator.watch.namespaces -}}
{{- fail "operator.watch.namespaces is only used with operator.watch.scope=namespace; with scope=cluster every namespace is watched, so leave the list empty" -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) -}}
{{- fail (printf "operator.replicas %v needs operator.peering.enabled=true: without peering every replica would act on every job. Add --set operator.peering.enabled=true (the replicas then elect one active operator), or keep operator.replicas=1" .Values.operator.replicas) -}}
{{- end -}}
{{- end -}}

{{- define "llamajob.dashboardLabels" -}}
{{- $pairs := list -}}
{{- range $k, $v := .Values.monitoring.dashboard.labels -}}
{{- $pairs = append $pairs (printf "%s=%q" $k $v) -}}
{{- end -}}
{{- join ", " $pairs -}}
{{- end -}}
