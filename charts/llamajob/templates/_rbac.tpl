{{/*
The operator's RBAC rules. operator/llamajob/permissions.py is the source of truth and says why
each rule exists; tests/test_chart.py renders the chart and fails if these differ from it.
*/}}

{{/* permissions.NAMESPACED: objects in the jobs' namespaces. */}}
{{- define "llamajob.rules.namespaced" -}}
- apiGroups: ["llamajob.dev"]
  resources: ["llamatrainingjobs"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["llamajob.dev"]
  resources: ["llamatrainingjobs/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods", "services", "configmaps"]
  verbs: ["create", "delete", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* permissions.CLUSTER: cluster-scoped objects, in every watch scope. */}}
{{- define "llamajob.rules.clusterScoped" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* permissions.NAMESPACE_DISCOVERY: only a namespace-confined kopf lists namespaces. */}}
{{- define "llamajob.rules.namespaceDiscovery" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* permissions.NAMESPACED_PEERING */}}
{{- define "llamajob.rules.namespacedPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end -}}

{{/* permissions.CLUSTER_PEERING */}}
{{- define "llamajob.rules.clusterPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end -}}
